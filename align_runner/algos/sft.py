"""Supervised fine-tuning loss: next-token cross-entropy normalised by the optimizer step's token count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from align_runner.algos.logprobs import LOW_PRECISION, TargetLogps
from align_runner.algos.types import LossOutput

IGNORE_INDEX = -100
"""Label value of a position that is not trained on (prompt, padding); the Hugging Face convention."""


def sft_loss(
    logits: Tensor | TargetLogps,
    labels: Tensor | None,
    *,
    num_items: float | Tensor | None = None,
) -> LossOutput:
    """Next-token cross-entropy, summed over counted target tokens and divided by ``num_items``.

    logits: (B, T, V); labels: (B, T), aligned with the input ids, ``-100`` = not trained on. The
    shift happens here: the logit at position t is scored against ``labels[:, t+1]``.

    num_items: the number of counted target tokens in the whole optimizer step (all micro-batches
    and processes). Dividing every micro-batch's *sum* by this one global count makes the summed
    gradients independent of how the step is split; a per-micro-batch mean would weight the tokens
    of a short micro-batch more than those of a long one. None divides by this batch's own count
    (a plain token mean, exact when the step is a single batch).

    Metrics (this batch only, detached): ``mean_token_accuracy`` (argmax == target over counted
    tokens), ``num_tokens`` (counted target tokens).

    ``logits`` may instead be the ``TargetLogps`` of the counted tokens alone (the stages compute only
    those, see models/counted_head.py); ``labels`` is then not needed, and the result is the same.
    """
    if isinstance(logits, TargetLogps):
        return _loss_from_logps(logits, num_items)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1]
    targets = labels[:, 1:].long()
    # Upcast half-precision logits: the cross-entropy of a bf16 softmax is too coarse to sum over
    # thousands of tokens (see logprobs.py).
    if shift_logits.dtype in LOW_PRECISION:
        shift_logits = shift_logits.float()
    flat_logits = shift_logits.reshape(-1, shift_logits.size(-1))
    flat_targets = targets.reshape(-1)
    # reduction="sum" with ignore_index never builds a (B*T, V) log-prob tensor of its own.
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")

    counted = flat_targets != IGNORE_INDEX
    num_tokens = counted.sum()
    with torch.no_grad():
        correct = (flat_logits.argmax(dim=-1) == flat_targets) & counted
    return _output(total, correct.sum(), num_tokens, num_items)


def _loss_from_logps(picked: TargetLogps, num_items: float | Tensor | None) -> LossOutput:
    total = -picked.logps.sum()
    num_tokens = torch.tensor(picked.logps.numel(), device=picked.logps.device)
    return _output(total, picked.correct.sum(), num_tokens, num_items)


def _output(total: Tensor, correct: Tensor, num_tokens: Tensor, num_items: float | Tensor | None) -> LossOutput:
    """The summed NLL ``total`` over ``num_items`` (this batch's ``num_tokens`` when None), with metrics."""
    denom = num_tokens.to(total.dtype) if num_items is None else torch.as_tensor(num_items, dtype=total.dtype)
    # An empty batch (every label ignored) gives loss 0 rather than 0/0 = NaN.
    denom = torch.where(denom == 0, torch.ones_like(denom), denom).to(total.device)
    accuracy = correct.detach().float() / num_tokens.clamp(min=1).float()
    return LossOutput(total / denom, {"mean_token_accuracy": accuracy, "num_tokens": num_tokens.detach()})
