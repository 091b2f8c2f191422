"""Loss aggregations: how per-token losses of a batch of completions become one scalar.

The contract with the engine. An aggregation reads only the completion mask, before any forward
pass, and returns ``(weights, num_items)``:

    weights: (B, T) float, 0 outside the mask;
    num_items: float, how many "items" this micro-batch holds (what they are depends on the
        aggregation: sequences or tokens).

The micro-batch loss is ``masked_sum(per_token * weights, mask) / num_items`` (``aggregate``), a
mean over the micro-batch's items. The engine sums ``num_items`` over every micro-batch and process
of the optimizer step and rescales each micro-batch loss by ``num_items / global_items``, so the
step's loss is ``sum over the step of per_token * weights / global_items`` however it is split into
micro-batches, accumulation steps and processes. That holds because each token's weight depends
only on its own row (or on constants the caller fixes for the whole rollout), never on the rest of
the micro-batch.

Every aggregation takes the mask positionally and any context by keyword (``max_completion_length``,
``mean_completion_tokens``), swallowing the ones it does not use, so a caller can pass the same
context to all of them. Pure tensor functions: no models, no I/O, no config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from align_runner.algos.logprobs import masked_sum

Aggregation = Callable[..., tuple[Tensor, float]]
"""``fn(mask, **context) -> (weights (B, T), num_items)``."""


def _float_mask(mask: Tensor) -> Tensor:
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    # float32 whatever the mask's dtype: exact enough for 1/length factors, and a half-precision
    # per-token loss multiplied by them is promoted to float32 instead of the weights being rounded.
    return (mask != 0).to(torch.float32)


def _positive(name: str, value: Any) -> float:
    value = float(value)
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def grpo(mask: Tensor, **_: Any) -> tuple[Tensor, float]:
    """GRPO's sequence-mean of token-means (Shao et al. 2024, eq. 3's ``1/G sum_i 1/|o_i| sum_t``).

    weights = 1/|y_i| on sequence i's counted tokens; num_items counts sequences (B). Each
    completion weighs the same whatever its length, so a long wrong answer's tokens are each
    penalised less than a short one's (the length bias Dr. GRPO points out).
    """
    m = _float_mask(mask)
    lengths = m.sum(dim=-1, keepdim=True).clamp(min=1)
    return m / lengths, float(m.shape[0])


def dr_grpo(mask: Tensor, *, max_completion_length: int, **_: Any) -> tuple[Tensor, float]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3): token sum divided by
    (sequences x max completion length), a constant instead of each sequence's own length.

    weights = 1/max_completion_length on counted tokens; num_items counts sequences (B). Every token
    weighs the same, removing GRPO's length bias, and the normaliser does not depend on the batch.
    """
    length = _positive("max_completion_length", max_completion_length)
    m = _float_mask(mask)
    return m / length, float(m.shape[0])


def dapo(mask: Tensor, **_: Any) -> tuple[Tensor, float]:
    """DAPO's token-level mean (Yu et al. 2025, "DAPO", sec. 3.3, eq. 12's ``1/sum_i |o_i| sum_i sum_t``)
    over every completion token of the optimizer step.

    weights = 1 on counted tokens; num_items counts counted tokens (mask.sum()). Every token weighs
    the same, so long completions get a say proportional to their length.
    """
    m = _float_mask(mask)
    return m, float(m.sum())


def bnpo(mask: Tensor, *, mean_completion_tokens: float | Tensor, **_: Any) -> tuple[Tensor, float]:
    """BNPO-style batch normalisation: token sum divided by (sequences x the rollout batch's mean
    completion length).

    ``mean_completion_tokens`` is one constant for the whole rollout batch (counted completion tokens
    of the rollout / its number of completions), computed once by the caller; it must not be
    recomputed per micro-batch, or the normaliser would depend on the split. weights =
    1/mean_completion_tokens on counted tokens; num_items counts sequences (B). Over a step that
    covers the whole rollout this equals DAPO's token mean.
    """
    mean_tokens = _positive("mean_completion_tokens", mean_completion_tokens)
    m = _float_mask(mask)
    return m / mean_tokens, float(m.shape[0])


AGGREGATIONS: dict[str, Aggregation] = {"grpo": grpo, "dr_grpo": dr_grpo, "dapo": dapo, "bnpo": bnpo}
"""Aggregation name (the ``loss_type`` of the GRPO stage) -> function."""


def aggregate(per_token: Tensor, mask: Tensor, weights: Tensor, num_items: float | Tensor) -> Tensor:
    """The micro-batch loss ``masked_sum(per_token * weights, mask) / num_items``, a scalar.

    per_token, mask, weights: (B, T). Padding positions never leak, even when ``per_token`` holds
    inf/NaN there (``masked_sum`` selects rather than multiplies). num_items == 0 (an empty
    micro-batch, whose sum is 0 too) gives 0 instead of 0/0.
    """
    total = masked_sum(per_token * weights, mask)
    denom = torch.as_tensor(num_items, dtype=total.dtype, device=total.device)
    return total / torch.where(denom == 0, torch.ones_like(denom), denom)
