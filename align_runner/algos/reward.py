"""Reward-model loss: Bradley-Terry pairwise likelihood, with optional margin and reward centering."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from align_runner.algos.types import LossOutput


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> LossOutput:
    """Bradley-Terry loss of a scalar reward model (Ouyang et al. 2022, eq. 1).

    chosen_rewards, rejected_rewards: (B,) scalar rewards r_c, r_r of each pair.
    margin: (B,) or scalar, optional; the pair must win by at least this much (Llama 2, Touvron et
    al. 2023, uses the annotators' preference strength here).

        loss = mean_B[ -log sigma(r_c - r_r - margin) ] + center_coef * mean_B[ (r_c + r_r)^2 ]

    The second term is reward centering (Eisenstein et al. 2023, "Helping or herding?"): BT is
    invariant to adding a constant to every reward, so the penalty pins the mean reward near 0,
    which keeps rewards comparable across checkpoints and well scaled for PPO.

    Metrics (detached): ``accuracy`` (fraction with r_c > r_r), ``margin`` (mean r_c - r_r, without
    the supplied margin), ``rewards/chosen_mean``, ``rewards/rejected_mean``, ``rewards/std``
    (population std of all 2B rewards).
    """
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            "chosen_rewards and rejected_rewards must both have shape (B,); got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef > 0:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).pow(2).mean()

    with torch.no_grad():
        everything = torch.cat([chosen_rewards, rejected_rewards]).float()
        metrics = {
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.float().mean(),
            "rewards/chosen_mean": chosen_rewards.float().mean(),
            "rewards/rejected_mean": rejected_rewards.float().mean(),
            "rewards/std": everything.std(correction=0),
        }
    return LossOutput(loss, metrics)
