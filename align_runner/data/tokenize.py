"""Tokenize validated rows into plain python lists of token ids, with loss masks.

Three outputs, one per consumer:

* :func:`tokenize_sft` -> ``input_ids``, ``loss_mask`` (1 = the token is a training target);
* :func:`tokenize_preference` -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids``;
* :func:`tokenize_prompt` -> ``prompt_ids``, ``prompt_text`` plus the row's other columns.

Standard (string) rows are tokenized with the tokenizer's own special tokens (a BOS where the model
uses one) and end with EOS. Conversational rows are rendered by the chat template, which already
writes every special token, so they are tokenized without adding any.

Prompt/response boundaries: prompt + response ids always equal the tokenisation of the whole text,
split at the length of the prompt tokenized alone. When the two disagree at the boundary (a token
merging across it), the split moves back to where they agree and a :class:`BoundaryWarning` is
emitted.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from align_runner.data.formats import Format, Kind, extract_implicit_prompt
from align_runner.data.templates import render_chat

BOUNDARY_MESSAGE = (
    "tokenizing the prompt alone and prompt+response disagree at the boundary (the prompt's tokens "
    "are not a prefix of the joint tokens); using the joint tokenisation, split where the two agree, "
    "so the merged token counts as response (shown once; end prompts / start responses at a word "
    "boundary to avoid it)"
)


class BoundaryWarning(UserWarning):
    """The prompt's tokens are not a prefix of the prompt+response tokens."""


def tokenize_sft(
    row: Mapping,
    fmt: Format,
    tokenizer: Any,
    *,
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
    chat_template: str | None = None,
) -> dict:
    """``{"input_ids": [...], "loss_mask": [...]}`` (same length) for a language-modeling or
    prompt-completion row.

    standard text: every token trained, EOS appended. standard prompt/completion: prompt +
    completion + EOS; only completion + EOS trained when ``completion_only_loss``.
    conversational messages: the rendered conversation; with ``assistant_only_loss`` only the
    assistant messages' tokens (content and end-of-turn token) are trained.
    conversational prompt/completion: the prompt rendered with the generation header, the
    completion is the rest of the rendered conversation.
    """
    if fmt.kind is Kind.LANGUAGE_MODELING and not fmt.conversational:
        ids = _with_eos(_encode(tokenizer, row["text"], special=True), tokenizer)
        return {"input_ids": ids, "loss_mask": [1] * len(ids)}
    if fmt.kind is Kind.LANGUAGE_MODELING:
        return _tokenize_messages(row["messages"], tokenizer, assistant_only_loss, chat_template)
    if fmt.kind is Kind.PROMPT_COMPLETION:
        prompt_ids, (response_ids,) = _prompt_and_responses(
            row["prompt"], [row["completion"]], fmt, tokenizer, chat_template
        )
        ids = prompt_ids + response_ids
        if not completion_only_loss:
            return {"input_ids": ids, "loss_mask": [1] * len(ids)}
        return {"input_ids": ids, "loss_mask": [0] * len(prompt_ids) + [1] * len(response_ids)}
    raise ValueError(f"tokenize_sft takes language-modeling or prompt-completion rows, got {fmt}")


def tokenize_preference(row: Mapping, fmt: Format, tokenizer: Any, *, chat_template: str | None = None) -> dict:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` for a preference row.

    A row without ``prompt`` has it extracted from the shared start of chosen/rejected first.
    Each response ends with EOS (standard) or the template's end-of-turn token (conversational).
    A numeric ``margin`` column (preference strength, for the reward loss) is passed through.
    """
    if fmt.kind is not Kind.PREFERENCE:
        raise ValueError(f"tokenize_preference takes preference rows, got {fmt}")
    prompt, chosen, rejected = preference_parts(row)
    prompt_ids, (chosen_ids, rejected_ids) = _prompt_and_responses(
        prompt, [chosen, rejected], fmt, tokenizer, chat_template
    )
    out = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    if row.get("margin") is not None:
        out["margin"] = row["margin"]
    return out


def tokenize_prompt(row: Mapping, fmt: Format, tokenizer: Any, *, chat_template: str | None = None) -> dict:
    """The row's columns unchanged plus ``prompt_ids`` and ``prompt_text`` (what generation starts from).

    Conversational prompts are rendered with the generation header (the model's turn comes next).
    Preference rows without ``prompt`` get the extracted one under ``prompt``.
    """
    if "prompt" in row:
        prompt = row["prompt"]
    elif fmt.kind is Kind.PREFERENCE:
        prompt = preference_parts(row)[0]
    else:
        raise ValueError(f"tokenize_prompt needs a 'prompt' column, got {fmt} with columns {sorted(row)}")
    if fmt.conversational:
        text = render_chat(tokenizer, prompt, add_generation_prompt=True, chat_template=chat_template)
        ids = _encode(tokenizer, text, special=False)
    else:
        text, ids = prompt, _encode(tokenizer, prompt, special=True)
    return {**row, "prompt": prompt, "prompt_ids": ids, "prompt_text": text}


def preference_parts(row: Mapping) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` with the prompt extracted when the row has none."""
    if "prompt" in row:
        return row["prompt"], row["chosen"], row["rejected"]
    return extract_implicit_prompt(row["chosen"], row["rejected"])


# ------------------------------------------------------------------------- prompt + response
def _prompt_and_responses(
    prompt: Any, responses: Sequence[Any], fmt: Format, tokenizer: Any, chat_template: str | None
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of each response, such that ``prompt + response`` is exactly
    the joint tokenisation of prompt and response.

    The split point is the prompt's length, or, where a token merges across the boundary (e.g.
    ``"Hello "`` + ``"world"``: ``Hello|Ġ`` alone, ``Hello|Ġworld`` joint), the length of the
    prefix on which the prompt tokenized alone and every joint tokenisation agree, so the merged
    token belongs to the response instead of being lost. A :class:`BoundaryWarning` says so.
    """
    if fmt.conversational:
        prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True, chat_template=chat_template)
        prompt_ids = _encode(tokenizer, prompt_text, special=False)
        joints = [
            _encode(tokenizer, render_chat(tokenizer, list(prompt) + list(r), chat_template=chat_template), special=False)
            for r in responses
        ]
    else:
        prompt_ids = _encode(tokenizer, prompt, special=True)
        joints = [_with_eos(_encode(tokenizer, prompt + r, special=True), tokenizer) for r in responses]
    agree = min(_common_prefix_length(prompt_ids, joint) for joint in joints)
    if agree < len(prompt_ids):
        warnings.warn(BOUNDARY_MESSAGE, BoundaryWarning, stacklevel=3)
    response_ids = [joint[agree:] for joint in joints]
    if fmt.conversational:
        # Keep each response ending at its end-of-turn token (drop e.g. ChatML's trailing "\n").
        response_ids = [r[: end_of_turn_length(r, tokenizer)] for r in response_ids]
    return prompt_ids[:agree], response_ids


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------------------- conversations
def _tokenize_messages(
    messages: Sequence[dict], tokenizer: Any, assistant_only_loss: bool, chat_template: str | None
) -> dict:
    text = render_chat(tokenizer, messages, chat_template=chat_template)
    ids = _encode(tokenizer, text, special=False)
    if not assistant_only_loss:
        return {"input_ids": ids, "loss_mask": [1] * len(ids)}
    spans = _assistant_spans_by_prefix(messages, ids, tokenizer, chat_template)
    if spans is None:
        spans = _assistant_spans_by_offsets(messages, text, ids, tokenizer)
    mask = [0] * len(ids)
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return {"input_ids": ids, "loss_mask": mask}


def _assistant_spans_by_prefix(
    messages: Sequence[dict], full_ids: list[int], tokenizer: Any, chat_template: str | None
) -> list[tuple[int, int]] | None:
    """Token spans of assistant messages, found by rendering growing prefixes of the conversation.

    Assistant message i spans from the end of ``messages[:i]`` + generation header to the end of
    ``messages[:i+1]``, cut after its end-of-turn token. Exact whenever each prefix's tokens are a
    prefix of the full tokens; returns None otherwise (templates that rewrite earlier turns, e.g.
    dropping past reasoning, or BPE merges across a turn boundary).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            head = render_chat(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template)
            upto = render_chat(tokenizer, messages[: i + 1], chat_template=chat_template)
        except Exception:  # e.g. a template that refuses a conversation starting with assistant
            return None
        head_ids = _encode(tokenizer, head, special=False)
        upto_ids = _encode(tokenizer, upto, special=False)
        if full_ids[: len(head_ids)] != head_ids or full_ids[: len(upto_ids)] != upto_ids:
            return None
        spans.append((len(head_ids), end_of_turn_length(upto_ids, tokenizer)))
    return spans


def _assistant_spans_by_offsets(
    messages: Sequence[dict], text: str, full_ids: list[int], tokenizer: Any
) -> list[tuple[int, int]]:
    """Fallback when prefixes do not tokenize as prefixes: find each assistant content in the
    rendered text (in order) and map its characters to tokens through the offset mapping, adding
    the special token that closes the turn. Less exact (a template that rewrites content would be
    missed), hence only the fallback."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("assistant_only_loss with this chat template needs a fast tokenizer "
                         "(offset mapping); load it with use_fast=True or set assistant_only_loss=false")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    if list(encoded["input_ids"]) != full_ids:
        raise ValueError("tokenizer gave different ids with offsets; cannot locate assistant tokens")
    special = special_token_ids(tokenizer)
    spans, cursor = [], 0
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"] or ""
        begin = text.find(content, cursor)
        if begin < 0:
            raise ValueError(f"assistant message {position} was not found in the rendered conversation; "
                             f"the chat template changes its content, so set assistant_only_loss=false")
        finish = cursor = begin + len(content)
        tokens = [t for t, (s, e) in enumerate(offsets) if s < finish and e > begin and t not in special]
        first = tokens[0] if tokens else next((t for t, (s, _) in enumerate(offsets) if s >= begin), len(offsets))
        last = tokens[-1] + 1 if tokens else first
        if last < len(full_ids) and full_ids[last] in special:  # the turn's end-of-turn token
            last += 1
        spans.append((first, last))
    return spans


# -------------------------------------------------------------------------------- token utils
def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token (eos, pad, chat markers such as <|im_end|>)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def end_of_turn_length(ids: Sequence[int], tokenizer: Any) -> int:
    """Length of ``ids`` without whitespace-only tokens that follow its last special token.

    ChatML writes ``<|im_end|>\\n``: the turn ends at ``<|im_end|>``; the newline belongs to the
    layout between turns, not to what the model must learn to emit.
    """
    special = special_token_ids(tokenizer)
    end = len(ids)
    while end > 0 and ids[end - 1] not in special and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    if 0 < end < len(ids) and ids[end - 1] in special:
        return end
    return len(ids)


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so sequences can end (and generation stop)")
    return ids if ids and ids[-1] == eos else [*ids, eos]
