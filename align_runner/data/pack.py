"""Grouping sequences by length: padding-free packing into rows, and token-budget micro-batches.

Two pure planning functions over lengths (``best_fit_decreasing``, ``token_budget_batches``) and the
packed row layout (``pack_sequences``) that the packed collators build on. A packed row holds several
examples back to back with ``position_ids`` restarting at 0 for each; transformers reads those restarts
as sequence boundaries (flash-attention's varlen path, and a block-diagonal causal mask for sdpa / eager
when no attention mask is passed), so attention never crosses examples and each example's logits are
those it has alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` tokens.

    Longest first, each into the bin it fills most tightly (the one with the least room left that still
    fits it), else a new bin: few bins, little padding. Ties keep the input order, so the plan is a
    function of the lengths alone. Bins come out in creation order, indices within a bin by placement.
    """
    if capacity < 1:
        raise ValueError(f"packing capacity must be >= 1 token, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, more than the packing capacity of {capacity}")
        fits = [b for b in range(len(bins)) if room[b] >= n]
        if fits:
            best = min(fits, key=lambda b: room[b])
            bins[best].append(i)
            room[best] -= n
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into micro-batches of rows of similar length.

    Rows are taken shortest first (ties in input order) and a micro-batch grows while its padded size,
    rows x its longest row, stays within ``budget``; a row longer than the budget gets a micro-batch of
    its own. Which rows share a micro-batch only changes speed and memory: the loss is normalised by the
    whole optimizer step's item count (engine/loop.py).
    """
    if budget < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {budget}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        current = batches[-1] if batches else None
        # ascending order: row i is the longest of the batch it joins
        if current is not None and (len(current) + 1) * lengths[i] <= budget:
            current.append(i)
        else:
            batches.append([i])
    return batches


def split_to_count(batches: list[list[int]], count: int) -> list[list[int]]:
    """``batches`` with the largest ones halved until there are ``count`` of them.

    Every process must run the same number of micro-batches per step (DDP / ZeRO reduce gradients in
    each backward), so the processes with fewer split theirs. Needs ``count`` <= the number of rows.
    """
    out = [list(b) for b in batches]
    if count > sum(len(b) for b in out):
        raise ValueError(f"cannot split {sum(len(b) for b in out)} rows into {count} micro-batches")
    while len(out) < count:
        big = max(range(len(out)), key=lambda j: len(out[j]))
        half = len(out[big]) // 2
        out[big : big + 1] = [out[big][:half], out[big][half:]]
    return out


def pack_sequences(
    sequences: Sequence[Sequence[int]], counted: Sequence[Sequence[int]], capacity: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """``sequences`` packed by best-fit-decreasing into rows of at most ``capacity`` tokens.

    counted: per sequence, 1 where a token is trained on (SFT's loss mask, a response token in DPO).
    Returns (R, W) long tensors, W the longest packed row:

    - ``input_ids``; ``position_ids`` restarting at 0 at each sequence. The padding at a row's end gets
      positions 0.. too, so it is a block of its own that no real token attends to.
    - ``loss_mask``: ``counted`` with each sequence's FIRST token set to 0: in a packed row the logit
      before it belongs to the previous sequence, so it must never be scored (a padded row never scores
      column 0 either, so the counted tokens are the same).
    - ``sequence_ids``: the index in ``sequences`` of each token, -1 on padding.
    """
    bins = best_fit_decreasing([len(s) for s in sequences], capacity)
    width = max(sum(len(sequences[i]) for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(bins), width), dtype=torch.long)
    seq = torch.full((len(bins), width), -1, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for r, members in enumerate(bins):
        col = 0
        for i in members:
            n = len(sequences[i])
            if n == 0:
                continue
            ids[r, col : col + n] = torch.as_tensor(sequences[i], dtype=torch.long)
            mask[r, col : col + n] = torch.as_tensor(counted[i], dtype=torch.long)
            mask[r, col] = 0
            seq[r, col : col + n] = i
            positions[r, col : col + n] = torch.arange(n)
            col += n
        positions[r, col:] = torch.arange(width - col)
    return {"input_ids": ids, "position_ids": positions, "loss_mask": mask, "sequence_ids": seq}
