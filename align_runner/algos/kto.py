"""KTO and its unpaired relatives: losses over single completions labelled desirable or undesirable.

Every loss has the signature ``fn(logps: UnpairedLogps, *, beta=0.1, desirable_weight=1.0,
undesirable_weight=1.0) -> LossOutput`` and returns the weighted mean over the batch's rows. Notation,
all of shape (B,):

    r  = policy - ref                        (each completion's log-ratio)
    z0 = max(0, mean(policy_kl - ref_kl))    (KTO's reference point, detached)
    w  = desirable_weight where the row is desirable, undesirable_weight where it is not
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from align_runner.algos.types import LossOutput


class UnpairedLogps(NamedTuple):
    """Sequence log-probs of one batch of labelled completions, every field of shape (B,).

    policy / ref: log pi(y | x) of each row's own completion under the policy / the reference.
    policy_kl / ref_kl: the same for a *mismatched* completion (another row's, to this row's prompt),
    the samples of KTO's KL estimate.
    desirable: 1.0 where the completion is desirable (label true), 0.0 where it is not.
    """

    policy: Tensor
    ref: Tensor
    policy_kl: Tensor
    ref_kl: Tensor
    desirable: Tensor


def _check(logps: UnpairedLogps, beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight} and {undesirable_weight}"
        )
    shape = logps.policy.shape
    if len(shape) != 1:
        raise ValueError(f"unpaired log-probs must have shape (B,), got {tuple(shape)}")
    for name, value in logps._asdict().items():
        if value.shape != shape:
            raise ValueError(f"UnpairedLogps.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def kl_reference_point(logps: UnpairedLogps) -> Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    sec. 4.1): the batch estimate of KL(pi || pi_ref) from mismatched prompt/completion pairs,
    ``max(0, mean(policy_kl - ref_kl))``, detached (it sets the reference point, it is not optimised)."""
    with torch.no_grad():
        return (logps.policy_kl - logps.ref_kl).mean().clamp(min=0)


def _weights(desirable: Tensor, desirable_weight: float, undesirable_weight: float) -> Tensor:
    return desirable * desirable_weight + (1 - desirable) * undesirable_weight


def unpaired_metrics(logps: UnpairedLogps, beta: float, z0: Tensor, anchor: Tensor) -> dict[str, Tensor]:
    """``rewards/chosen`` / ``rewards/rejected``: mean implicit reward beta*r of the desirable / the
    undesirable rows (0 when the batch has none); ``rewards/accuracies``: the fraction of rows on their
    label's side of the loss's anchor (KTO: z0; desirable: r > anchor, undesirable: r < anchor; a tie,
    as at the start where the policy is the reference, counts as wrong); ``kl``: z0;
    ``logps/chosen`` / ``logps/rejected``: mean policy log-probs of desirable / undesirable rows."""
    with torch.no_grad():
        good = logps.desirable.float()
        bad = 1 - good
        reward = beta * (logps.policy - logps.ref).float()

        def mean_over(values: Tensor, mask: Tensor) -> Tensor:
            return (values * mask).sum() / mask.sum().clamp(min=1)

        above = (reward > beta * anchor).float()
        below = (reward < beta * anchor).float()
        return {
            "rewards/chosen": mean_over(reward, good),
            "rewards/rejected": mean_over(reward, bad),
            "rewards/accuracies": (good * above + bad * below).mean(),
            "kl": z0.float(),
            "logps/chosen": mean_over(logps.policy.float(), good),
            "logps/rejected": mean_over(logps.policy.float(), bad),
        }


def kto_loss(
    logps: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 8): with the value v of a completion relative to z0,

        desirable:    w_d * (1 - sigma(beta (r - z0)))
        undesirable:  w_u * (1 - sigma(beta (z0 - r)))

    Desirable completions are pushed above the reference point, undesirable ones below it. The paper
    advises weights with w_d * n_d / (w_u * n_u) in [1, 4/3] when the classes are imbalanced.
    """
    _check(logps, beta, desirable_weight, undesirable_weight)
    z0 = kl_reference_point(logps)
    r = logps.policy - logps.ref
    good = logps.desirable.to(r.dtype)
    value = good * torch.sigmoid(beta * (r - z0)) + (1 - good) * torch.sigmoid(beta * (z0 - r))
    losses = _weights(good, desirable_weight, undesirable_weight) * (1 - value)
    return LossOutput(losses.mean(), unpaired_metrics(logps, beta, z0, anchor=z0))


def apo_zero_unpaired_loss(
    logps: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> LossOutput:
    """APO-zero, unpaired (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions"): ``w_d * (1 - sigma(beta r))`` for a desirable row, ``w_u * sigma(beta r)`` for an
    undesirable one; anchored at 0 instead of KTO's z0 (the KL samples are read for the metric only)."""
    _check(logps, beta, desirable_weight, undesirable_weight)
    r = logps.policy - logps.ref
    good = logps.desirable.to(r.dtype)
    s = torch.sigmoid(beta * r)
    losses = _weights(good, desirable_weight, undesirable_weight) * (good * (1 - s) + (1 - good) * s)
    return LossOutput(losses.mean(), unpaired_metrics(logps, beta, kl_reference_point(logps), anchor=torch.zeros(())))
