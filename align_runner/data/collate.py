"""Collators: lists of tokenized examples -> padded torch batches.

Training batches are right-padded (positions stay 0..n-1 for every real token, so no position ids
are needed); generation batches are left-padded so every prompt ends at the last column and new
tokens are appended after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Number
from typing import Any

import torch

from align_runner.data.pack import best_fit_decreasing, pack_sequences

IGNORE_INDEX = -100  # the ignore_index of torch.nn.functional.cross_entropy


def collate_sft(examples: Sequence[Mapping], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict:
    """Right-padded SFT batch.

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``labels`` (B, T) long: the
    input ids with -100 where ``loss_mask`` is 0 or on padding, and ``num_items``: the number of
    target tokens the loss counts, ``(labels[:, 1:] != -100).sum()`` since the loss shifts labels by
    one (the first token is never predicted).
    """
    _check(examples, pad_id)
    rows = [list(e["input_ids"]) for e in examples]
    width = _width(rows, pad_to_multiple_of)
    input_ids = _pad(rows, width, pad_id, left=False)
    attention_mask = _pad([[1] * len(r) for r in rows], width, 0, left=False)
    trained = _pad([list(e["loss_mask"]) for e in examples], width, 0, left=False)
    labels = input_ids.masked_fill(trained == 0, IGNORE_INDEX)
    num_items = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_items": num_items}


def collate_preference(examples: Sequence[Mapping], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict:
    """Chosen and rejected sequences of B pairs in one right-padded batch of 2B rows.

    Returns ``input_ids`` (2B, T) long: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected
    (so ``tensor.chunk(2)`` splits them); ``attention_mask`` (2B, T); ``loss_mask`` (2B, T) long, 1 on
    response tokens only; ``num_items`` = B (the loss is one term per pair). Scalar numeric fields of
    the examples (e.g. precomputed ``ref_chosen_logps``) become (B,) tensors; other fields lists.
    """
    _check(examples, pad_id)
    sequences, masks = _preference_sequences(examples)
    width = _width(sequences, pad_to_multiple_of)
    batch = {
        "input_ids": _pad(sequences, width, pad_id, left=False),
        "attention_mask": _pad([[1] * len(s) for s in sequences], width, 0, left=False),
        "loss_mask": _pad(masks, width, 0, left=False),
        "num_items": len(examples),
    }
    batch.update(_extra_fields(examples, {"prompt_ids", "chosen_ids", "rejected_ids"}, tensors=True))
    return batch


def collate_packed_sft(examples: Sequence[Mapping], pad_id: int, *, max_tokens: int) -> dict:
    """SFT examples packed padding-free into rows of at most ``max_tokens`` tokens (``data/pack.py``;
    rows as long as the longest example when it is longer).

    Returns ``input_ids``, ``position_ids`` (restarting at 0 per example), ``labels`` (-100 off the loss
    mask, on padding and on each example's first token) and ``sequence_ids``, all (R, W), and
    ``num_items``: the same count of target tokens as ``collate_sft`` gives for these examples. No
    ``attention_mask``: the restarting positions keep attention inside each example.
    """
    _check(examples, pad_id)
    sequences = [list(e["input_ids"]) for e in examples]
    packed = pack_sequences(sequences, [list(e["loss_mask"]) for e in examples], _capacity(sequences, max_tokens), pad_id)
    labels = packed["input_ids"].masked_fill(packed.pop("loss_mask") == 0, IGNORE_INDEX)
    return {**packed, "labels": labels, "num_items": int((labels != IGNORE_INDEX).sum())}


def collate_packed_preference(examples: Sequence[Mapping], pad_id: int, *, max_tokens: int) -> dict:
    """``collate_preference``'s 2B sequences (chosen 0..B-1, then rejected) packed padding-free into
    rows of at most ``max_tokens`` tokens: ``input_ids``, ``position_ids``, ``loss_mask`` (response
    tokens) and ``sequence_ids`` (which of the 2B sequences each token belongs to, -1 on padding),
    all (R, W); ``num_items`` = B; the examples' extra fields as in ``collate_preference``."""
    _check(examples, pad_id)
    sequences, masks = _preference_sequences(examples)
    packed = pack_sequences(sequences, masks, _capacity(sequences, max_tokens), pad_id)
    batch: dict[str, Any] = {**packed, "num_items": len(examples)}
    batch.update(_extra_fields(examples, {"prompt_ids", "chosen_ids", "rejected_ids"}, tensors=True))
    return batch


def collate_packed_pairs_sharing_prompts(examples: Sequence[Mapping], pad_id: int, *, max_tokens: int) -> dict:
    """Each pair as ONE unit, prompt + chosen + rejected, the units packed best-fit decreasing into rows
    of at most ``max_tokens`` tokens (rows as long as the longest unit when it is longer).

    The rejected response attends to the prompt and to itself, never to the chosen one (a 4-D
    ``attention_mask``, (R, 1, W, W) bool), its positions continuing from the prompt's end: every token
    has the hidden state it has in its own prompt + response sequence, while a pair costs P + C + R
    positions instead of 2P + C + R.

    Returns ``input_ids``, ``position_ids``, ``attention_mask``; ``sequence_ids``: i on chosen i's
    tokens, B + i on rejected i's (``collate_preference``'s order of the 2B sequences), -1 on prompts
    and padding, so each sequence's last token is where a reward model's score is read; ``loss_mask``:
    1 on response tokens; ``predicted_from``: the column whose logits predict each token, the one before
    it except for a rejected response's first token, predicted from its prompt's last column (all
    (R, W) long). As in the other layouts a sequence's first token is never scored, so with an empty
    prompt a response's first token is not counted. ``num_items`` = B; the examples' extra fields as in
    ``collate_preference``.
    """
    _check(examples, pad_id)
    parts = [(list(e["prompt_ids"]), list(e["chosen_ids"]), list(e["rejected_ids"])) for e in examples]
    units = [p + c + r for p, c, r in parts]
    bins = best_fit_decreasing([len(u) for u in units], _capacity(units, max_tokens))
    width = max(sum(len(units[i]) for i in b) for b in bins)
    shape = (len(bins), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    sequence = torch.full(shape, -1, dtype=torch.long)
    unit = torch.full(shape, -1, dtype=torch.long)
    part = torch.zeros(shape, dtype=torch.long)  # 0 prompt (the shared prefix), 1 chosen, 2 rejected
    counted = torch.zeros(shape, dtype=torch.long)
    source = (torch.arange(width) - 1).clamp(min=0).repeat(len(bins), 1)
    for r, members in enumerate(bins):
        col = 0
        for i in members:
            prompt, chosen, rejected = (len(x) for x in parts[i])
            n = len(units[i])
            ids[r, col : col + n] = torch.as_tensor(units[i], dtype=torch.long)
            unit[r, col : col + n] = i
            positions[r, col : col + n] = torch.cat(
                [torch.arange(prompt), torch.arange(prompt, prompt + chosen), torch.arange(prompt, prompt + rejected)]
            )
            chosen_cols = slice(col + prompt, col + prompt + chosen)
            rejected_cols = slice(col + prompt + chosen, col + n)
            sequence[r, chosen_cols], part[r, chosen_cols] = i, 1
            sequence[r, rejected_cols], part[r, rejected_cols] = len(examples) + i, 2
            counted[r, col + prompt : col + n] = 1
            if prompt:
                source[r, col + prompt + chosen] = col + prompt - 1
            else:  # nothing before a response's first token predicts it
                counted[r, col] = counted[r, col + chosen] = 0
            col += n
    batch: dict[str, Any] = {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": _branch_attention(unit, part),
        "sequence_ids": sequence,
        "loss_mask": counted,
        "predicted_from": source,
        "num_items": len(examples),
    }
    batch.update(_extra_fields(examples, {"prompt_ids", "chosen_ids", "rejected_ids"}, tensors=True))
    return batch


def _preference_sequences(examples: Sequence[Mapping]) -> tuple[list[list[int]], list[list[int]]]:
    """prompt + chosen of every pair, then prompt + rejected, with response masks."""
    sequences, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            prompt, response = list(e["prompt_ids"]), list(e[side])
            sequences.append(prompt + response)
            masks.append([0] * len(prompt) + [1] * len(response))
    return sequences, masks


def collate_prompts(examples: Sequence[Mapping], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict:
    """LEFT-padded prompts for generation: ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long,
    plus every other field as a list under its own name (``prompt_text``, ``answer``, ...)."""
    _check(examples, pad_id)
    rows = [list(e["prompt_ids"]) for e in examples]
    width = _width(rows, pad_to_multiple_of)
    batch = {
        "input_ids": _pad(rows, width, pad_id, left=True),
        "attention_mask": _pad([[1] * len(r) for r in rows], width, 0, left=True),
    }
    batch.update(_extra_fields(examples, {"prompt_ids"}, tensors=False))
    return batch


def sft_tokens(example: Mapping) -> int:
    """Tokens an SFT example adds to a padded batch (``train.max_tokens_per_batch`` groups by it)."""
    return len(example["input_ids"])


def pair_tokens(example: Mapping) -> int:
    """Tokens a preference pair adds to a padded batch: two rows as wide as its longer sequence."""
    return 2 * (len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"])))


# ---------------------------------------------------------------------------------- helpers
def _check(examples: Sequence[Mapping], pad_id: Any) -> None:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if pad_id is None or isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an int token id (use eos_token_id when the tokenizer has no pad "
                         f"token), got {pad_id!r}")


def _capacity(sequences: Sequence[Sequence[int]], max_tokens: int) -> int:
    # a sequence longer than max_tokens (e.g. prompt + response past data.max_length) gets a row of its own
    return max(max_tokens, *(len(s) for s in sequences))


def _width(rows: Sequence[Sequence[int]], multiple: int | None) -> int:
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple  # round up: tensor cores like multiples of 8/64
    return width


def _pad(rows: Sequence[Sequence[int]], width: int, value: int, *, left: bool) -> torch.Tensor:
    """(len(rows), width) long tensor; each row padded with ``value`` on the left or right."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        values = torch.as_tensor(row, dtype=torch.long)
        if left:
            out[i, width - len(row):] = values
        else:
            out[i, : len(row)] = values
    return out


def _extra_fields(examples: Sequence[Mapping], skip: set[str], *, tensors: bool) -> dict:
    """Every key except ``skip`` (union over examples, missing -> None); scalars become tensors when
    ``tensors`` and every value is a number."""
    keys: list[str] = []
    for e in examples:
        keys.extend(k for k in e if k not in skip and k not in keys)
    out: dict[str, Any] = {}
    for key in keys:
        values = [e.get(key) for e in examples]
        numeric = all(isinstance(v, Number) and not isinstance(v, bool) for v in values)
        out[key] = torch.tensor(values) if tensors and numeric else values
    return out


def collate_completions(examples: Sequence[Mapping], pad_id: int, *, share_prompts: bool = False) -> dict:
    """Prompt + completion rows of an online-RL rollout: prompts LEFT-padded to a common width P and
    completions RIGHT-padded to a common width C, so every row's completion starts at column P.

    Returns ``input_ids`` / ``attention_mask`` / ``position_ids`` (B, P + C) (positions count real
    tokens only, as in generation), ``completion_ids`` and ``completion_mask`` (B, C). The logits at
    columns P-1 .. P+C-2 predict the completion tokens, so a forward with ``logits_to_keep=C + 1`` has
    the LM head run on those columns alone. Scalar fields become (B,) tensors.

    ``share_prompts`` replaces the model inputs with the shared-prompt layout (``_shared_prompt_layout``):
    the completions of one prompt in one packed row, the prompt computed once.
    """
    _check(examples, pad_id)
    prompts = [list(e["prompt_ids"]) for e in examples]
    completions = [list(e["completion_ids"]) for e in examples]
    p_width, c_width = _width(prompts, None), max(1, _width(completions, None))
    prompt_ids = _pad(prompts, p_width, pad_id, left=True)
    completion_ids = _pad(completions, c_width, pad_id, left=False)
    attention = torch.cat(
        [_pad([[1] * len(p) for p in prompts], p_width, 0, left=True), _pad([[1] * len(c) for c in completions], c_width, 0, left=False)],
        dim=1,
    )
    batch: dict[str, Any] = {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "completion_ids": completion_ids,
        "completion_mask": attention[:, p_width:],
    }
    if share_prompts:
        batch.update(_shared_prompt_layout(prompts, completions, c_width, pad_id))
    skip = {"prompt_ids", "completion_ids"}
    batch.update(_extra_fields(examples, skip, tensors=True))
    return batch


def _shared_prompt_layout(prompts: list[list[int]], completions: list[list[int]], width: int, pad_id: int) -> dict:
    """The completions of each distinct prompt packed behind ONE copy of it, each attending to the
    prompt and to itself only (a 4-D attention mask), positions continuing from the prompt's end.

    A group of G completions of a P-token prompt then costs P + G x C positions instead of G x (P + C):
    the same attention, so the same logits and gradients, for much less compute when prompts are long.
    Every packed row has the same layout: the prompt left-padded to the widest, then K slots of ``width``
    columns (K: the most completions any prompt has here), so one index list (``logit_index``, the
    columns whose logits predict slot tokens) serves every row. ``row_of`` / ``slot_of`` map each
    original row to its packed row and slot.
    """
    distinct: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        distinct.setdefault(tuple(p), []).append(i)
    slots = max(len(rows) for rows in distinct.values())
    p_width = max(len(p) for p in distinct)
    total = p_width + slots * width
    ids = torch.full((len(distinct), total), pad_id, dtype=torch.long)
    positions = torch.zeros((len(distinct), total), dtype=torch.long)
    region = torch.full((len(distinct), total), -2, dtype=torch.long)  # -2 pad, -1 prompt, s slot s
    row_of, slot_of = [0] * len(prompts), [0] * len(prompts)
    for r, (prompt, members) in enumerate(distinct.items()):
        start = p_width - len(prompt)
        ids[r, start:p_width] = torch.tensor(prompt, dtype=torch.long)
        positions[r, start:p_width] = torch.arange(len(prompt))
        region[r, start:p_width] = -1
        for s, i in enumerate(members):
            row_of[i], slot_of[i] = r, s
            c, first = completions[i], p_width + s * width
            ids[r, first : first + len(c)] = torch.tensor(c, dtype=torch.long)
            positions[r, first : first + len(c)] = torch.arange(len(prompt), len(prompt) + len(c))
            region[r, first : first + len(c)] = s
    # the prompt is every slot's shared prefix (part 0), slot s is branch s + 1
    allowed = _branch_attention(torch.where(region == -2, -1, 0), region + 1)
    slot_starts = p_width + width * torch.arange(slots)
    # slot token t is predicted from column (prompt end if t == 0, else the slot's column t - 1)
    index = (slot_starts[:, None] + torch.arange(width)[None, :] - 1).clone()
    index[:, 0] = p_width - 1
    return {
        "input_ids": ids,
        "attention_mask": allowed,
        "position_ids": positions,
        "logit_index": index.reshape(-1),
        "row_of": torch.tensor(row_of),
        "slot_of": torch.tensor(slot_of),
    }


def _branch_attention(group: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """(R, 1, W, W) bool attention mask of packed rows whose units share a prefix: ``group`` (R, W) is
    each token's unit (-1 on padding), ``part`` 0 on a unit's shared prefix and k > 0 on its k-th branch.

    A real token sees the earlier tokens of its unit's prefix and of its own branch, never another
    branch's or unit's; a pad sees itself only (a query row with nothing to attend to would give NaN).
    """
    width = group.shape[1]
    qg, kg = group[:, :, None], group[:, None, :]
    qp, kp = part[:, :, None], part[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (qg == kg) & (qg >= 0) & ((kp == 0) | (kp == qp))
    allowed |= torch.eye(width, dtype=torch.bool) & (qg < 0)
    return allowed[:, None]


def preference_collator(pad_id: int, *, packing: bool, max_tokens: int, share_prompts: bool = False):
    """The collate function of a preference stage: padded pairs, or with ``packing`` (``train.packing``)
    the 2B sequences packed into rows of ``max_tokens`` (``data.max_length``); with ``share_prompts``
    too, each pair packed as one prompt + chosen + rejected unit, its prompt computed once (attention
    kernels that take arbitrary masks only: not flash-attention's varlen path)."""
    from functools import partial

    if packing and share_prompts:
        return partial(collate_packed_pairs_sharing_prompts, pad_id=pad_id, max_tokens=max_tokens)
    if packing:
        return partial(collate_packed_preference, pad_id=pad_id, max_tokens=max_tokens)
    return partial(collate_preference, pad_id=pad_id)
