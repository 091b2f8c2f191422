"""The GRPO-family policy loss: clipped surrogate plus an optional KL penalty, aggregated per ``reduce.py``.

One function covers GRPO (Shao et al. 2024), Dr. GRPO, DAPO's clip-higher and token mean, and GSPO's
sequence-level ratio; which one is a matter of keyword arguments and of the aggregation the caller
picked for ``weights``/``num_items``. Hydra builds the configured loss as a partial:
``{_target_: align_runner.algos.grpo.grpo_loss, _partial_: true, epsilon_high: 0.28}``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from align_runner.algos.kl import kl_estimate
from align_runner.algos.logprobs import masked_mean
from align_runner.algos.policy import clip_fractions, clipped_surrogate, importance_ratio
from align_runner.algos.reduce import aggregate
from align_runner.algos.types import LossOutput


class PolicyBatch(NamedTuple):
    """What the policy loss reads for one micro-batch of B completions padded to T tokens."""

    logps: Tensor
    """(B, T) per-token log-probs of the completion tokens under the policy being trained (has grad)."""
    mask: Tensor
    """(B, T) 1 on the completion tokens that count."""
    advantages: Tensor
    """(B,) one advantage per completion (see ``advantages.py``), or (B, T) one per token (PPO's GAE)."""
    weights: Tensor
    """(B, T) from an aggregation in ``reduce.py``."""
    num_items: Tensor | float
    """This micro-batch's item count from the same aggregation."""
    old_logps: Tensor | None = None
    """(B, T) under the behaviour policy; None means on-policy (the ratio uses ``logps.detach()``)."""
    ref_logps: Tensor | None = None
    """(B, T) under the frozen reference; needed when beta > 0."""
    entropy: Tensor | None = None
    """(B, T) token entropies of the policy, only logged."""


def _check(batch: PolicyBatch) -> None:
    """Fail early on shapes that would broadcast silently into a wrong loss."""
    shape = batch.logps.shape
    if len(shape) != 2:
        raise ValueError(f"PolicyBatch.logps must have shape (B, T), got {tuple(shape)}")
    for name in ("mask", "weights", "old_logps", "ref_logps", "entropy"):
        value = getattr(batch, name)
        if value is not None and value.shape != shape:
            raise ValueError(f"PolicyBatch.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if batch.advantages.shape not in (shape[:1], shape):
        raise ValueError(
            f"PolicyBatch.advantages has shape {tuple(batch.advantages.shape)}, expected "
            f"({shape[0]},) or {tuple(shape)}"
        )


def grpo_loss(
    batch: PolicyBatch,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    kl_estimator: str = "k3",
) -> LossOutput:
    """GRPO objective (Shao et al. 2024, "DeepSeekMath", eq. 3), negated for minimisation:

        loss_{i,t} = -min(r_{i,t} A_i, clip(r_{i,t}, 1 - epsilon_low, 1 + epsilon_high) A_i)
                     + beta * KL_{i,t}(pi_theta || pi_ref)
        loss = sum_{i,t} mask * weights * loss_{i,t} / num_items

    r is ``importance_ratio(logps, old_logps, level=importance_sampling_level)``: per token, or GSPO's
    length-normalised sequence ratio (``"sequence"``). With ``old_logps`` None the update is on-policy:
    r equals 1 in value but still carries the gradient of logps, so the loss reduces to the policy
    gradient ``-A grad log pi``. KL_{i,t} is the ``kl_estimator`` (``"k1"``/``"k2"``/``"k3"``; the paper
    uses k3) evaluated on the sampled tokens; beta = 0 (the default, as in DAPO and Dr. GRPO) drops
    it, and beta > 0 requires ``ref_logps``.

    Metrics (this micro-batch, detached scalars): ``policy_loss`` (the surrogate term alone,
    aggregated the same way), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean`` (see ``policy.clip_fractions``), ``kl`` (masked token mean of the
    estimator, when ``ref_logps`` is given) and ``entropy`` (masked token mean, when given).
    """
    _check(batch)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not (0 <= epsilon_low < 1 and epsilon_high >= 0):
        raise ValueError(
            f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got epsilon_low={epsilon_low}, "
            f"epsilon_high={epsilon_high}"
        )
    if beta > 0 and batch.ref_logps is None:
        raise ValueError("grpo_loss with beta > 0 needs PolicyBatch.ref_logps")

    logps, mask = batch.logps, batch.mask
    old_logps = logps.detach() if batch.old_logps is None else batch.old_logps
    ratio = importance_ratio(logps, old_logps, mask, level=importance_sampling_level)
    surrogate = clipped_surrogate(ratio, batch.advantages, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    policy_loss = aggregate(surrogate, mask, batch.weights, batch.num_items)

    kl: Tensor | None = None
    if batch.ref_logps is not None:
        # Padding may hold arbitrary log-probs; pinning the reference to the policy there makes the
        # estimate exactly 0 instead of an exp() that could overflow and poison the backward pass.
        ref = torch.where(mask != 0, batch.ref_logps, logps.detach())
        kl = kl_estimate(logps, ref, kl_estimator)
    if beta > 0:
        assert kl is not None  # ref_logps checked above
        loss = aggregate(surrogate + beta * kl, mask, batch.weights, batch.num_items)
    else:
        loss = policy_loss

    with torch.no_grad():
        clipped = clip_fractions(
            ratio, batch.advantages, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high
        )
        metrics: dict[str, Tensor] = {
            "policy_loss": policy_loss.detach().float(),
            "clip_ratio/low_mean": clipped["low"],
            "clip_ratio/high_mean": clipped["high"],
            "clip_ratio/region_mean": clipped["region"],
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach().float(), mask)
        if batch.entropy is not None:
            metrics["entropy"] = masked_mean(batch.entropy.detach().float(), mask)
    return LossOutput(loss, metrics)
