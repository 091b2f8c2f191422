"""Classic RLHF PPO with a learned critic: per-token rewards, whitening, GAE, the value loss, statistics.

References:
  * Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate, eq. 7; the
    policy loss is ``grpo.grpo_loss`` with (B, T) advantages, wrapped by ``ppo_policy_loss``).
  * Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation" (GAE, eq. 16).
  * Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (reward = score minus
    a per-token KL penalty to the reference, sec. 2.2; the adaptive KL controller, sec. 2.2).
  * Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
    Summarization" (missing-EOS penalty, reward and advantage whitening, clipped value loss, the
    statistics PPO users log).

Shapes: B completions, T completion positions (right-padded). ``mask`` (B, T) is 1 (or True) on the
completion tokens that count. Pure tensor functions: no models, no I/O, no config.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align_runner.algos.grpo import PolicyBatch, grpo_loss
from align_runner.algos.kl import kl_estimate
from align_runner.algos.logprobs import masked_mean, masked_sum
from align_runner.algos.policy import importance_ratio
from align_runner.algos.reduce import aggregate
from align_runner.algos.types import LossOutput

WHITEN_EPS = 1e-8
"""Added to the variance before the square root, so a constant batch whitens to 0 instead of 0/0."""

KL_CONTROL_ERROR_CLIP = 0.2
"""Ziegler et al.'s bound on the adaptive controller's proportional error (sec. 2.2)."""


def _check_2d(mask: Tensor, **tensors: Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    for name, value in tensors.items():
        if value.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(mask.shape)} like mask")


def _check_rows(mask: Tensor, **tensors: Tensor) -> None:
    for name, value in tensors.items():
        if value.shape != mask.shape[:1]:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected ({mask.shape[0]},)")


def last_token_mask(mask: Tensor) -> Tensor:
    """(B, T) bool, True at the last counted position of each row; a row with none is all False."""
    counted = mask != 0
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(counted)
    last = torch.where(counted, positions, torch.full_like(positions, -1)).max(dim=-1, keepdim=True).values
    return (positions == last) & counted


def token_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, *, kl_coef: float, estimator: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token rewards with a KL penalty to the reference (Ziegler et al. 2019, sec. 2.2).

        kl_{b,t}      = estimator(logps, ref_logps)_{b,t} on counted tokens, 0 elsewhere
        reward_{b,t}  = -kl_coef * kl_{b,t} + scores_b * [t is row b's last counted token]

    scores: (B,) reward-model scores of the whole completions (after any ``missing_eos_penalty``);
    logps, ref_logps: (B, T) sampled-token log-probs under the policy that sampled them and the frozen
    reference; estimator ``"k1"`` (Ziegler et al.'s ``log pi - log pi_ref``) or ``"k3"`` (non-negative,
    lower variance; see ``kl.py``). Returns (rewards, kl), both (B, T) and detached: rewards are
    constants of the rollout, the policy is only trained through the surrogate. A row with no counted
    token gets no score and no penalty.
    """
    _check_2d(mask, logps=logps, ref_logps=ref_logps)
    _check_rows(mask, scores=scores)
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    with torch.no_grad():
        counted = mask != 0
        logps = logps.detach()
        # Padding may hold arbitrary log-probs; pinning the reference to the policy there makes the
        # estimate exactly 0 rather than an exp() that could overflow (k3) before the mask drops it.
        ref = torch.where(counted, ref_logps.detach(), logps)
        kl = torch.where(counted, kl_estimate(logps, ref, estimator), torch.zeros_like(logps))
        score_at_end = last_token_mask(mask) * scores.detach().to(kl.dtype).unsqueeze(-1)
        return -kl_coef * kl + score_at_end, kl


def adaptive_kl_coef(
    coef: float, kl: float | Tensor, n_steps: int, *, target: float | None, horizon: float
) -> float:
    """The next KL coefficient of Ziegler et al.'s proportional controller (2019, sec. 2.2).

        error = clip(kl / target - 1, -0.2, 0.2)
        new   = coef * (1 + error * n_steps / horizon)

    kl: the rollout's measured KL (mean over completions of the per-row sum, ``objective/kl``);
    n_steps: how many samples (episodes) this update covers; horizon: how many samples it takes to
    close the gap. The clip keeps one noisy measurement from moving the coefficient by more than
    ``0.2 * n_steps / horizon``. ``target=None`` means a fixed coefficient: ``coef`` is returned.
    """
    if target is None:
        return float(coef)
    if not target > 0 or not horizon > 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
    error = min(max(float(kl) / target - 1, -KL_CONTROL_ERROR_CLIP), KL_CONTROL_ERROR_CLIP)
    return float(coef) * (1 + error * n_steps / horizon)


def missing_eos_penalty(scores: Tensor, has_eos: Tensor, penalty: float | None) -> Tensor:
    """Scores with ``penalty`` subtracted from completions that did not end with EOS, (B,) -> (B,).

    A truncated completion is usually an unfinished answer that the reward model may still score
    well; penalising it teaches the policy to finish (Huang et al. 2024, who replace the
    score by a constant instead). ``penalty`` None or 0 leaves the scores unchanged.
    """
    if has_eos.shape != scores.shape:
        raise ValueError(f"has_eos has shape {tuple(has_eos.shape)}, expected {tuple(scores.shape)} like scores")
    if not penalty:
        return scores
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def masked_moments(values: Tensor, mask: Tensor) -> Tensor:
    """(count, sum, sum of squares) of the counted values, a float64 (3,) tensor.

    Sums, unlike means, add up across processes: all-reduce (SUM) the result of every process and
    pass it to ``whiten(moments=...)`` to whiten with the statistics of the global batch. float64
    keeps ``sum of squares - count * mean^2`` accurate over many tokens.
    """
    _check_2d(mask, values=values)
    x = values.detach().double()
    counted = mask != 0
    return torch.stack([counted.sum().double(), masked_sum(x, counted), masked_sum(x * x, counted)])


def whiten(values: Tensor, mask: Tensor, *, moments: Tensor | None = None, shift_mean: bool = True) -> Tensor:
    """Whitened values over the counted positions, (B, T) -> (B, T), 0 off the mask.

        out = (values - mean) / sqrt(var + 1e-8)          (shift_mean=True: advantages)
        out = (values - mean) / sqrt(var + 1e-8) + mean   (shift_mean=False: rewards keep their mean)

    Huang et al. 2024 whiten advantages, and optionally rewards; rewards keep their mean because
    shifting it would add a constant per token, i.e. a length-dependent bonus or penalty. ``var`` is
    the unbiased (Bessel-corrected, divide by count - 1) variance: the batch is a sample of the
    policy's returns and this estimates their spread without bias; over a rollout's many tokens it
    differs from the biased one by a factor count / (count - 1), close to 1. With fewer than two
    counted values there is no spread to measure and var is taken as 0.

    moments: the all-reduced ``masked_moments`` of the global batch; None uses this tensor's own.
    The result is detached: whitened rewards and advantages are constants of the rollout.
    """
    _check_2d(mask, values=values)
    moments = masked_moments(values, mask) if moments is None else moments.detach().double()
    if moments.shape != (3,):
        raise ValueError(f"moments must be (count, sum, sum of squares), got shape {tuple(moments.shape)}")
    count, total, squares = moments.unbind()
    mean = total / count.clamp(min=1)
    var = ((squares - count * mean**2) / (count - 1)).clamp(min=0) if count >= 2 else mean.new_zeros(())
    out = (values.detach().double() - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(mask != 0, out, torch.zeros_like(out)).to(values.dtype)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) and value targets, (B, T) each.

    Backwards over each row's counted positions t (the next counted position is t + 1 in the
    right-padded layout; positions off the mask are skipped, so a hole in the mask is bridged):

        delta_t = r_t + gamma * V_{t+1} - V_t        with V after the last counted token = 0
        A_t     = delta_t + gamma * lam * A_{t+1}    with A after the last counted token = 0
        R_t     = A_t + V_t                          (the value head's regression target)

    rewards: from ``token_rewards`` (optionally whitened); values: the critic's values at the rollout.
    Returns (advantages, returns), detached and 0 off the mask; a row with no counted token is all 0.
    The episode ends at the completion's end, hence V = 0 there: nothing more is rewarded after it.
    """
    _check_2d(mask, rewards=rewards, values=values)
    with torch.no_grad():
        counted = mask != 0
        rewards, values = rewards.detach(), values.detach()
        next_value = torch.zeros_like(values[:, 0])
        next_adv = torch.zeros_like(values[:, 0])
        advantages = torch.zeros_like(values)
        for t in reversed(range(values.shape[-1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv_t = delta + gamma * lam * next_adv
            here = counted[:, t]
            advantages[:, t] = torch.where(here, adv_t, torch.zeros_like(adv_t))
            next_value = torch.where(here, values[:, t], next_value)
            next_adv = torch.where(here, adv_t, next_adv)
        returns = torch.where(counted, advantages + values, torch.zeros_like(values))
        return advantages, returns


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, *, clip_range: float
) -> tuple[Tensor, Tensor]:
    """Per-token clipped value loss and whether its clipped branch was the larger, (B, T) each.

        V_clip = clip(V, V_old - c, V_old + c)
        loss   = 0.5 * max((V - R)^2, (V_clip - R)^2)

    The PPO-style trust region for the critic (Huang et al. 2024, the value-clipping detail): where
    V has moved more than c away from the rollout's V_old and the clipped branch is the larger, the
    token gets no gradient, since V_clip is constant in V there. values has the gradient; old_values
    and returns are rollout constants (detached). Aggregating over tokens is the caller's, with a
    ``reduce.py`` weights/num_items pair (see ``ppo_value_loss``).
    """
    if not clip_range >= 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    if old_values.shape != values.shape or returns.shape != values.shape:
        raise ValueError(
            f"values, old_values and returns must share a shape; got {tuple(values.shape)}, "
            f"{tuple(old_values.shape)}, {tuple(returns.shape)}"
        )
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns) ** 2
    clipped = (torch.clamp(values, old_values - clip_range, old_values + clip_range) - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    weights: Tensor,
    num_items: Tensor | float,
    *,
    clip_range: float,
    coef: float = 1.0,
) -> LossOutput:
    """The critic's loss for one micro-batch: ``coef * aggregate(clipped_value_loss, ...)``.

    values: (B, T) the critic's current values (has grad); old_values: at the rollout; returns: from
    ``gae``; weights/num_items: from a ``reduce.py`` aggregation (e.g. ``dapo``'s token mean), so
    micro-batch and process splits give the gradient of the whole batch. Hydra builds it as a partial:
    ``{_target_: align_runner.algos.ppo.ppo_value_loss, _partial_: true, clip_range: 0.2}``.

    Metrics (detached scalars): ``loss/value_avg`` (the aggregated loss before ``coef``),
    ``val/clipfrac_avg`` (fraction of counted tokens where the clipped branch was larger),
    ``val/vpred`` (mean value), ``val/error`` (mean squared error to the returns).
    """
    _check_2d(mask, values=values, old_values=old_values, returns=returns, weights=weights)
    per_token, clipped = clipped_value_loss(values, old_values, returns, clip_range=clip_range)
    value_loss = aggregate(per_token, mask, weights, num_items)
    with torch.no_grad():
        metrics = {
            "loss/value_avg": value_loss.detach().float(),
            "val/clipfrac_avg": masked_mean(clipped.float(), mask),
            "val/vpred": masked_mean(values.detach().float(), mask),
            "val/error": masked_mean(((values.detach() - returns.detach()) ** 2).float(), mask),
        }
    return LossOutput(coef * value_loss, metrics)


def approx_kl(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """Masked token mean of 0.5 * (logps - old_logps)^2, a detached scalar: the "approxkl" between the
    policy being trained and the one that sampled the rollout (Huang et al. 2024), for monitoring."""
    _check_2d(mask, logps=logps, old_logps=old_logps)
    with torch.no_grad():
        return masked_mean((0.5 * (logps - old_logps) ** 2).float(), mask)


def ppo_policy_loss(batch: PolicyBatch, *, clip_range: float = 0.2) -> LossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with per-token (B, T) GAE advantages.

    This is ``grpo_loss`` with a symmetric clip range and no KL term (the KL penalty is already in
    the rewards); token weighting comes from ``batch.weights``/``num_items`` (``reduce.dapo``, a
    token mean, is the usual PPO choice). ``batch.old_logps`` are the rollout's log-probs. Hydra:
    ``{_target_: align_runner.algos.ppo.ppo_policy_loss, _partial_: true, clip_range: 0.2}``.

    Metrics under the names PPO users know: ``loss/policy_avg``, ``policy/clipfrac_avg`` (tokens
    whose clipped branch was taken), ``policy/approxkl_avg``, ``val/ratio`` (mean ratio; it sits
    under ``val/`` for historical reasons) and ``policy/entropy_avg`` when ``batch.entropy`` is given.
    """
    out = grpo_loss(batch, epsilon_low=clip_range, epsilon_high=clip_range, beta=0.0)
    with torch.no_grad():
        old_logps = batch.logps if batch.old_logps is None else batch.old_logps
        ratio = importance_ratio(batch.logps.detach(), old_logps, batch.mask)
        metrics = {
            "loss/policy_avg": out.metrics["policy_loss"],
            "policy/clipfrac_avg": out.metrics["clip_ratio/region_mean"],
            "policy/approxkl_avg": approx_kl(batch.logps, old_logps, batch.mask),
            "val/ratio": masked_mean(ratio.float(), batch.mask),
        }
        if "entropy" in out.metrics:
            metrics["policy/entropy_avg"] = out.metrics["entropy"]
    return LossOutput(out.loss, metrics)


def rollout_stats(
    scores: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float, logps: Tensor | None = None
) -> dict[str, Tensor]:
    """Statistics of one rollout (detached scalars), under the names PPO users know:

      * ``objective/kl``: mean over completions of the per-row sum of the per-token KL;
      * ``objective/non_score_reward``: mean over completions of the per-row sum of -kl_coef * kl;
      * ``objective/rlhf_reward``: mean of scores + that per-row non-score reward (what PPO maximises);
      * ``objective/scores``: mean score;
      * ``objective/entropy`` (when the sampled tokens' ``logps`` are given): mean over completions
        of the per-row sum of -logps, a one-sample estimate of the sequence entropy.

    scores: (B,) after any ``missing_eos_penalty``; kl: (B, T) from ``token_rewards``.
    """
    _check_2d(mask, kl=kl, **({} if logps is None else {"logps": logps}))
    _check_rows(mask, scores=scores)
    with torch.no_grad():
        kl_per_row = masked_sum(kl.detach().float(), mask, dim=-1)
        non_score = -kl_coef * kl_per_row
        stats = {
            "objective/kl": kl_per_row.mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (scores.detach().float() + non_score).mean(),
            "objective/scores": scores.detach().float().mean(),
        }
        if logps is not None:
            stats["objective/entropy"] = masked_sum(-logps.detach().float(), mask, dim=-1).mean()
        return stats


def minibatch_indices(
    num_samples: int, mini_batch_size: int, *, ppo_epochs: int, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Row indices of every mini-batch of one rollout: ``ppo_epochs`` passes, each a fresh shuffle
    cut into ``num_samples / mini_batch_size`` mini-batches (Schulman et al. 2017, Algorithm 1: K
    epochs of minibatch SGD on the same rollout). Every epoch visits each row exactly once.

    ``num_samples`` must be a multiple of ``mini_batch_size``, so every optimizer step averages over
    the same number of completions; pass a seeded ``generator`` for a reproducible order.
    """
    if mini_batch_size <= 0 or ppo_epochs <= 0 or num_samples % mini_batch_size:
        raise ValueError(
            f"need ppo_epochs > 0 and a rollout of {num_samples} samples that is a positive multiple of "
            f"mini_batch_size; got mini_batch_size={mini_batch_size}, ppo_epochs={ppo_epochs}"
        )
    return [
        batch
        for _ in range(ppo_epochs)
        for batch in torch.randperm(num_samples, generator=generator).split(mini_batch_size)
    ]
