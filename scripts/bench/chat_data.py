"""The benchmark's chat data, generated deterministically: conversational rows whose rendered length
(prompt + completion, counted with the model's tokenizer and chat template, as both trainers tokenize
them) is spread evenly over a range of tokens.

A row's messages are random words from a fixed list; the number of words is searched so the row reaches
its target length (a word is one or a few tokens, so a row may exceed its target by a few tokens, and
a target below what the template alone costs gives the shortest row possible: one word each side).
"""

from __future__ import annotations

import random
from collections.abc import Callable

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter "
    "mother answer found study still learn should world high every near add food between own below country "
    "plant last school father keep tree never start city earth eye light thought head under story saw left "
    "few while along might close something seem next hard open example begin life always those both paper"
).split()

Messages = list[dict[str, str]]


def conversation_tokens(tokenizer) -> Callable[[Messages], int]:
    """Tokens of a whole conversation as rendered by the tokenizer's chat template."""

    def count(messages: Messages) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count


def spread(n: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """``n`` target lengths evenly spaced over [lo, hi] (both ends included), in a shuffled order."""
    targets = [lo + round(i * (hi - lo) / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(targets)
    return targets


def _smallest(fits: Callable[[int], bool], most: int) -> int:
    """The smallest word count in [1, most] for which ``fits`` holds (``most`` if none): a binary search,
    the token count growing with the words."""
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _text(words: list[str], n: int) -> str:
    return " ".join(words[:n]).capitalize() + "."


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _turns(user: str, assistant: str) -> Messages:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _prompt_words(count, user: list[str], response: list[str], target: int, share: float, hi: int) -> int:
    """Words of the user turn so the prompt takes about ``share`` of the tokens a ``target``-token row
    has beyond the template's own (the shortest row: one word each side)."""
    base = count(_turns(_text(user, 1), _text(response, 1)))
    want = base + share * (target - base)
    return _smallest(lambda k: count(_turns(_text(user, k), _text(response, 1))) >= want, hi)


def _response_words(count, prompt: str, response: list[str], target: int, hi: int) -> int:
    """Words of the assistant turn that bring the row to ``target`` tokens (or just past it)."""
    return _smallest(lambda k: count(_turns(prompt, _text(response, k))) >= target, hi)


def sft_rows(tokenizer, n: int, lo: int, hi: int, seed: int) -> tuple[list[dict], list[int]]:
    """``n`` prompt-completion rows (``prompt``: a user turn, ``completion``: the assistant's turn) and
    each row's rendered length, the lengths spread over [lo, hi]."""
    rng = random.Random(seed)
    count = conversation_tokens(tokenizer)
    rows, lengths = [], []
    for target in spread(n, lo, hi, rng):
        user, assistant = _words(rng, hi), _words(rng, hi)
        prompt = _text(user, _prompt_words(count, user, assistant, target, rng.uniform(0.2, 0.6), hi))
        completion = _text(assistant, _response_words(count, prompt, assistant, target, hi))
        messages = _turns(prompt, completion)
        rows.append({"prompt": messages[:1], "completion": messages[1:]})
        lengths.append(count(messages))
    return rows, lengths


def preference_rows(tokenizer, n: int, lo: int, hi: int, seed: int) -> tuple[list[dict], list[tuple[int, int]]]:
    """``n`` preference rows with an explicit ``prompt`` (a user turn) and ``chosen`` / ``rejected``
    assistant turns of different lengths, and each row's (prompt + chosen, prompt + rejected) rendered
    lengths, both spread over [lo, hi]."""
    rng = random.Random(seed)
    count = conversation_tokens(tokenizer)
    chosen_targets, rejected_targets = spread(n, lo, hi, rng), spread(n, lo, hi, rng)
    rows, lengths = [], []
    for t_chosen, t_rejected in zip(chosen_targets, rejected_targets):
        if t_rejected == t_chosen:  # different lengths: the pair's two sequences never pad alike
            t_rejected = t_chosen + 7 if t_chosen + 7 <= hi else t_chosen - 7
        user, chosen, rejected = _words(rng, hi), _words(rng, hi), _words(rng, hi)
        prompt = _text(user, _prompt_words(count, user, chosen, min(t_chosen, t_rejected), rng.uniform(0.2, 0.6), hi))
        good = _turns(prompt, _text(chosen, _response_words(count, prompt, chosen, t_chosen, hi)))
        bad = _turns(prompt, _text(rejected, _response_words(count, prompt, rejected, t_rejected, hi)))
        rows.append({"prompt": good[:1], "chosen": good[1:], "rejected": bad[1:]})
        lengths.append((count(good), count(bad)))
    return rows, lengths


def length_stats(lengths: list[int]) -> dict:
    return {
        "sequences": len(lengths),
        "tokens": sum(lengths),
        "min": min(lengths),
        "max": max(lengths),
        "mean": sum(lengths) / len(lengths),
    }
