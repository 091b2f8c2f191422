"""Reward functions under TRL's names, for GRPO runs written against ``trl.rewards``.

``accuracy_reward`` compares a completion's final answer with the ``solution`` column without a
symbolic-math dependency: the last ``\\boxed{...}`` of each (or, for the completion, its last number;
for the solution, its whole text), compared as numbers when both read as numbers (fractions included),
else as normalised text. ``RewardModel`` scores completions with a sequence-classification reward model
and its own tokenizer (GRPO's ``reward_funcs`` given as a model id or path).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from align_runner.algos.rewards import completion_text

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_FRAC = re.compile(r"^(-?)\\d?frac\{([^{}]+)\}\{([^{}]+)\}$")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: no answer


def normalize(answer: str) -> str:
    """Drop spaces, ``$``, ``\\left`` / ``\\right``, ``\\!`` and a trailing period."""
    text = answer.strip().strip("$").rstrip(".")
    for token in ("\\left", "\\right", "\\!", "\\,", " "):
        text = text.replace(token, "")
    return text.replace("dfrac", "frac").replace("tfrac", "frac")


def as_number(answer: str) -> Fraction | None:
    """``answer`` as an exact number: ``3``, ``-2.5``, ``1,000``, ``3/4``, ``\\frac{3}{4}``; else None."""
    text = normalize(answer)
    frac = _FRAC.match(text)
    if frac:
        text = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    if not re.fullmatch(_NUMBER, text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(completion: str) -> str | None:
    """A completion's answer: its last ``\\boxed{...}``, else its last number, else None."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def same_answer(predicted: str, gold: str) -> bool:
    p, g = as_number(predicted), as_number(gold)
    if p is not None and g is not None:
        return p == g
    return normalize(predicted) == normalize(gold)


def accuracy_reward(completions: Sequence[Any], solution: Sequence[str], **_: Any) -> list[float | None]:
    """1.0 when the completion's final answer equals the solution's, else 0.0; None (row skipped) when
    the solution has no answer to compare with. Completions are strings or message lists."""
    scores: list[float | None] = []
    for completion, sol in zip(completions, solution, strict=True):
        gold = last_boxed(sol)
        gold = sol if gold is None else gold
        if not normalize(gold):
            scores.append(None)
            continue
        predicted = final_answer(completion_text(completion))
        scores.append(float(predicted is not None and same_answer(predicted, gold)))
    return scores


class RewardModel:
    """A sequence-classification reward model (``num_labels=1``) scoring prompt + completion text,
    tokenized by its own tokenizer (a chat template for conversational rows): the reward of
    ``GRPOTrainer(reward_funcs="<model id or path>")``."""

    def __init__(self, path: str, *, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from align_runner.models.scorer import RewardModelScorer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        own_pad = AutoConfig.from_pretrained(path).pad_token_id
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.scorer = RewardModelScorer(path, device=device, batch_size=batch_size, pad_id=None if own_pad is not None else pad)
        self.__name__ = Path(path).name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        ids = [self._ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.scorer(prompt_ids=ids, completion_ids=[[] for _ in ids])

    def _ids(self, prompt: Any, completion: Any) -> list[int]:
        if isinstance(prompt, list):  # conversational: the whole exchange through the chat template
            reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            text = self.tokenizer.apply_chat_template(prompt + reply, tokenize=False)
        else:
            text = prompt + completion_text(completion)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
