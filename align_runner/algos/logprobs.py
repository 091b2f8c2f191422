"""Log-probability helpers shared by every loss: per-token and per-sequence log-probs, masked reductions.

Pure tensor functions: no models, no I/O, no config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Half-precision logits are upcast before the log-softmax. In bf16 a log-prob carries only ~3
# significant digits, so a sequence sum over hundreds of tokens has rounding error larger than the
# chosen-vs-rejected differences that DPO-style losses are built on.
# dtypes whose logits are upcast to fp32 before a log-softmax
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[targets] without materialising the full log-softmax.

    logits: (..., V); targets: (...) -> (...). ``logit[y] - logsumexp(logit)`` gathers one value per
    position instead of keeping a second (..., V) tensor of log-probs alive for the gather.
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets) under ``logits``: (B, T, V) and (B, T) -> (B, T), no shift (the caller aligned
    them). Half-precision logits are upcast to float32 one sequence at a time, as in
    ``shifted_token_logps``."""
    if logits.dtype in LOW_PRECISION:
        rows = [_token_logps(row.float(), tgt) for row, tgt in zip(logits, targets.long())]
        return torch.stack(rows) if rows else logits.new_zeros(targets.shape, dtype=torch.float32)
    return _token_logps(logits, targets.long())


def shifted_token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Log-probs of each token given its prefix: ``out[:, t-1] = log p(input_ids[:, t] | input_ids[:, <t])``.

    logits: (B, T, V), the model output at every position; input_ids: (B, T) -> (B, T-1), for t=1..T-1.
    Float32/float64 logits are used as they are; float16/bfloat16 logits are upcast to float32 one
    sequence at a time (so the extra memory is one (T, V) float32 copy, not (B, T, V)) and the
    result is float32.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and input_ids (B, T); got {tuple(logits.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    # The logit at position t predicts token t+1: drop the last logit and the first token.
    return token_logps(logits[:, :-1], input_ids[:, 1:])


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of token log-probs over the counted tokens of each sequence, and how many were counted.

    logits: (B, T, V); input_ids: (B, T); loss_mask: (B, T), aligned with input_ids: token t counts
    when ``loss_mask[:, t] == 1`` (``loss_mask[:, 0]`` is never used: the first token has no prefix).
    Returns (logps (B,), token_counts (B,) int64).
    """
    if loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    counted = loss_mask != 0
    # Tokens outside the mask may be padding with out-of-vocabulary ids (e.g. -100); any valid id
    # will do there since their log-probs are discarded, and an invalid one would make gather fail.
    safe_ids = input_ids.masked_fill(~counted, 0)
    token_logps = shifted_token_logps(logits, safe_ids)
    mask = counted[:, 1:]
    return masked_sum(token_logps, mask, dim=-1), mask.sum(dim=-1, dtype=torch.long)


@dataclass
class TargetLogps:
    """Log-probs of the counted target tokens of a batch only, flattened (N = counted tokens).

    ``logps`` (N,) log p(target); ``correct`` (N,) bool, whether the target was the argmax (SFT's token
    accuracy); ``sequence`` (N,) long, the index of the sequence each target belongs to (a padded
    batch's row, or an example of a packed row).
    """

    logps: Tensor
    correct: Tensor
    sequence: Tensor


def next_token_targets(input_ids: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
    """Which logits score a counted token, and the tokens they score.

    input_ids, counted: (B, T); token t is a target when ``counted[:, t]`` is non-zero (column 0 never
    is: it has no prefix). Returns ``positions`` (B, T) bool, True at column t-1 for each target at t
    (the logit at t-1 predicts token t), and ``targets`` (N,) in row-major order of ``positions``.
    """
    hit = counted[:, 1:] != 0
    positions = torch.zeros_like(input_ids, dtype=torch.bool)
    positions[:, :-1] = hit
    return positions, input_ids[:, 1:][hit]


def linear_token_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight.T + bias)[targets] and whether each target is an argmax.

    hidden: (N, H); weight: (V, H); targets: (N,) -> (logps (N,) float32 or wider, correct (N,) bool).
    At most ``chunk_size`` rows of (chunk, V) logits exist at a time: when there is more than one chunk,
    each chunk keeps only its logsumexp for backward and recomputes its logits there, so neither pass
    holds the (N, V) logits. Each row's value depends on its own hidden state only, so the chunking does
    not change the result.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keep = hidden.shape[0] <= chunk_size
    parts = [
        _ChunkLogps.apply(hidden[s : s + chunk_size], weight, bias, targets[s : s + chunk_size].long(), keep)
        for s in range(0, max(hidden.shape[0], 1), chunk_size)
    ]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class _ChunkLogps(torch.autograd.Function):
    """One chunk of ``linear_token_logps`` with the softmax worked in place on the logits' own buffer.

    The (N, V) logits are the step's largest tensor and every pass over them is memory-bound, so the
    forward makes four (max, subtract, exp, sum) and the backward one or three, where a composed
    gather + logsumexp + argmax and its autograd make about a dozen. d log p_t / d logits = onehot(t) -
    softmax. ``keep``: hold exp(logits - max) for backward (one chunk: the memory the logits would take
    anyway) instead of recomputing the logits there.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, keep: bool):
        logits = F.linear(hidden, weight, bias)  # under autocast: in the compute dtype
        ctx.compute_dtype = logits.dtype
        if logits.dtype in LOW_PRECISION:
            logits = logits.float()
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)
        top = logits.amax(dim=-1)
        correct = picked >= top
        shifted = logits.sub_(top[:, None]).exp_()  # exp(logits - max), in place
        total = shifted.sum(dim=-1)
        lse = total.log() + top
        ctx.mark_non_differentiable(correct)
        if keep:
            ctx.save_for_backward(hidden, weight, bias, targets, shifted, total)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse, None)
        return picked - lse, correct

    @staticmethod
    def backward(ctx, grad: Tensor, _correct: Tensor | None):
        hidden, weight, bias, targets, saved, total = ctx.saved_tensors
        dtype = ctx.compute_dtype
        if total is not None:  # saved = exp(logits - max), so softmax = saved / total (not in place:
            # a retained graph may run this backward again)
            grad_logits = saved * (-grad / total)[:, None]
        else:  # saved = logsumexp: recompute the logits, softmax = exp(logits - lse)
            logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
            if logits.dtype in LOW_PRECISION:
                logits = logits.float()
            grad_logits = logits.sub_(saved[:, None]).exp_().mul_(-grad[:, None])
        grad_logits.scatter_add_(-1, targets[:, None], grad[:, None].to(grad_logits.dtype))
        g = grad_logits.to(dtype)
        grad_hidden = (g @ weight.to(dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (g.T @ hidden.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def sequence_sums(values: Tensor, sequence: Tensor, num_sequences: int) -> Tensor:
    """(num_sequences,) sums of ``values`` (N,) by their ``sequence`` index (N,)."""
    return values.new_zeros(num_sequences).index_add(0, sequence, values)


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all dims when None).

    mask: broadcastable to x, 0/1 (bool or numeric) or non-negative weights. Positions with mask 0
    contribute exactly 0 even where x is inf/NaN (``inf * 0`` would be NaN), so padding never leaks.
    """
    weighted = torch.where(mask != 0, x * mask.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of x over the positions where mask is non-zero (weighted mean for weight masks).

    An all-zero mask gives 0, not NaN: an empty micro-batch must not poison the optimizer step.
    """
    mask = mask.to(x.dtype).expand_as(x)
    total = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / torch.where(total == 0, torch.ones_like(total), total)
