"""Advantage estimators for group-sampled online RL (GRPO and relatives).

Layout shared by every function: ``rewards`` is a (N,) tensor of scalar rewards laid out as P
consecutive groups of ``group_size`` = G completions of the same prompt (N = P * G, completion
``p * G + g`` is the g-th sample of prompt p). Each estimator returns (N,) advantages in the same
order, one per completion; the policy loss broadcasts it over the completion's tokens.

Every estimator replaces a learned value function with a baseline computed from the other samples
of the same prompt, so a group of one carries no signal (its advantage is always 0) and is rejected.

Pure tensor functions: no models, no I/O, no config.
"""

from __future__ import annotations

from torch import Tensor

SCALE_REWARDS = ("group", "batch", "none")
"""Valid values of ``group_advantages(scale_rewards=...)``."""


def _grouped(rewards: Tensor, group_size: int, *, min_size: int = 1) -> Tensor:
    """rewards (N,) -> (P, G) view, after checking the layout; integer/bool rewards become float."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < min_size:
        raise ValueError(f"group_size must be an int >= {min_size}, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"the number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size})"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2, outcome
    supervision): ``A_i = (r_i - mean(r_group)) / (std + eps)``.

    rewards: (N,) with N = P * group_size -> (N,).

    scale_rewards:
      * ``"group"``: std is the unbiased (Bessel-corrected) std of the completion's own group, as in
        the paper.
      * ``"batch"``: std is the unbiased std of all N rewards. A group whose rewards barely differ
        is then not blown up to unit scale, which keeps near-ties from dominating the update.
      * ``"none"``: no division, ``A_i = r_i - mean(r_group)`` (Dr. GRPO, Liu et al. 2025,
        "Understanding R1-Zero-Like Training"): dividing by the group std up-weights prompts that
        are nearly always or nearly never solved, a difficulty bias the paper removes.

    eps keeps a zero-variance group finite: its centred rewards are all 0, so its advantages are 0.
    Needs group_size >= 2 (see the module docstring).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = _grouped(rewards, group_size, min_size=2)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (grouped.std() + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs", eq. 5 baseline):

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j

    rewards: (N,) with N = P * group_size -> (N,). The baseline excludes the sample itself, so it is
    independent of r_i and the estimator stays unbiased. Needs group_size >= 2 (the other samples
    must exist).
    """
    grouped = _grouped(rewards, group_size, min_size=2)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def reinforce_pp_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-4) -> Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++: ...", sec. on the baseline variant):
    subtract the group mean, then normalise by the std over the whole batch:

        A'_i = r_i - mean(r_group(i));   A_i = A'_i / (std_batch(A') + eps)

    rewards: (N,) with N = P * group_size -> (N,). std_batch is the unbiased std of the N centred
    values A' (their batch mean is already 0, so this is the paper's global whitening). Unlike
    GRPO's per-group std, one batch-wide scale does not amplify low-variance groups. Needs
    group_size >= 2.
    """
    grouped = _grouped(rewards, group_size, min_size=2)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    return centred / (centred.std() + eps)


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(N,) bool, True for each completion whose group's rewards are all equal.

    Such a group has zero advantage under every estimator above and so contributes no policy
    gradient; DAPO's dynamic sampling (Yu et al. 2025, "DAPO", sec. 3.2) drops and resamples these
    groups. Exact equality (max == min) rather than ``std == 0`` so float rounding in the std does
    not decide.
    """
    grouped = _grouped(rewards, group_size)
    flat = grouped.amax(dim=1) == grouped.amin(dim=1)
    return flat.repeat_interleave(group_size)
