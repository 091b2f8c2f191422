"""Reward functions the benchmark gives to both align_runner and TRL (TRL's reward-function signature).

Imported by module path (``bench_rewards.length_reward``): run.py puts this directory on sys.path /
PYTHONPATH of its workers. Deliberately cheap, so the benchmark times the trainers, not the reward.
"""

from __future__ import annotations


def _text(completion) -> str:
    # conversational completions are [{"role": "assistant", "content": ...}], plain ones strings
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def length_reward(completions, **kwargs) -> list[float]:
    """(characters in the completion mod 7) / 6: differs within a group, so advantages are non-zero."""
    return [(len(_text(c)) % 7) / 6.0 for c in completions]
