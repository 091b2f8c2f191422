"""Policy-gradient pieces: importance ratios, the clipped surrogate, clip statistics, token entropy.

Shapes: B completions, T completion positions (padded), V vocabulary. ``mask`` (B, T) is 1 (or
True) on the completion tokens that count. Pure tensor functions: no models, no I/O, no config.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align_runner.algos.logprobs import LOW_PRECISION, masked_mean

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
"""Valid values of ``importance_ratio(level=...)``."""



def importance_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, *, level: str = "token") -> Tensor:
    """Importance ratio pi_theta / pi_old of each token, (B, T) -> (B, T).

    logps: (B, T) log-probs under the policy being trained (carries the gradient); old_logps: (B, T)
    under the behaviour policy that sampled the completions (treated as a constant: detached here).

    level:
      * ``"token"`` (PPO/GRPO): ``r_{i,t} = exp(logps_{i,t} - old_logps_{i,t})``.
      * ``"sequence"`` (GSPO; Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 7):
        ``s_i = exp(1/|y_i| sum_t (logps_{i,t} - old_logps_{i,t}))``, the length-normalised
        sequence likelihood ratio, broadcast to every position of row i. It is computed as the
        plain differentiable masked mean (no stop-gradient tricks), so every broadcast copy has
        value s_i and ``d r_{i,t'} / d logps_{i,t} = s_i / |y_i|`` for each counted token t and
        every t', exactly the gradient of GSPO's eq. 7. (GSPO-token, eq. 13, would instead use
        ``sg[s_i] * exp(logps - sg[logps])``, giving gradient s_i to its own token only; under an
        aggregation whose weights are constant within a sequence, as all of ``reduce.py``'s are,
        both give the same total gradient.)

    Positions outside the mask get log-ratio 0 (ratio 1 at token level): padding may hold arbitrary
    log-probs, and an overflowing ``exp`` there would turn into NaN gradients even though the loss
    masks its value. A sequence with no counted token gets s_i = 1.
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape or logps.dim() != 2:
        raise ValueError(
            f"logps, old_logps and mask must share a (B, T) shape; got {tuple(logps.shape)}, "
            f"{tuple(old_logps.shape)}, {tuple(mask.shape)}"
        )
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")
    counted = mask != 0
    log_ratio = torch.where(counted, logps - old_logps.detach(), torch.zeros_like(logps))
    if level == "token":
        return log_ratio.exp()
    lengths = counted.sum(dim=-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)
    seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / lengths
    return seq_log_ratio.exp().expand_as(logps)


def _per_row(advantages: Tensor, ratio: Tensor) -> Tensor:
    """(B,) advantages -> (B, 1) so they broadcast over the T tokens; (B, T) is used as given."""
    if advantages.dim() == 1 and advantages.shape[0] == ratio.shape[0]:
        return advantages.unsqueeze(-1)
    if advantages.shape == ratio.shape:
        return advantages
    raise ValueError(
        f"advantages must have shape (B,) or (B, T) matching ratio {tuple(ratio.shape)}, "
        f"got {tuple(advantages.shape)}"
    )


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, *, epsilon_low: float, epsilon_high: float
) -> Tensor:
    """Per-token clipped surrogate loss (to minimise), (B, T).

        loss_{i,t} = -min(r_{i,t} A_i, clip(r_{i,t}, 1 - epsilon_low, 1 + epsilon_high) A_i)

    PPO's clipped objective (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    eq. 7), negated. Separate bounds are DAPO's clip-higher (Yu et al. 2025, "DAPO", sec. 3.1): a
    larger epsilon_high lets low-probability tokens with positive advantage grow further, which
    keeps entropy from collapsing. ratio: (B, T); advantages: (B,) broadcast over tokens (or
    (B, T)), treated as constants (detached) since they come from the rewards, not the policy.
    Where the min picks the clipped term the token's gradient is 0: the update is already far
    enough from the behaviour policy in the direction the advantage asks for.
    """
    adv = _per_row(advantages, ratio).detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    return -torch.minimum(unclipped, clipped)


def clip_fractions(
    ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
) -> dict[str, Tensor]:
    """Fractions of counted tokens whose surrogate is clipped (gradient cut off), detached scalars.

    ratio, mask: (B, T); advantages: (B,) (or (B, T)). Keys:
      * ``"low"``: ``r < 1 - epsilon_low`` and ``A < 0`` (the policy already lowered the token enough);
      * ``"high"``: ``r > 1 + epsilon_high`` and ``A > 0`` (already raised it enough);
      * ``"region"``: either of the two.
    Each is the masked mean over tokens. A ratio outside the range with the other advantage sign is
    not counted: there the unclipped term is the min and the gradient still flows.
    """
    with torch.no_grad():
        adv = _per_row(advantages, ratio)
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        as_float = {"low": low, "high": high, "region": low | high}
        return {key: masked_mean(value.float(), mask) for key, value in as_float.items()}


def _entropy(logits: Tensor) -> Tensor:
    # H = -sum p log p with log p = logit - logsumexp(logit): never exponentiates an unshifted logit.
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = log_probs.exp()
    # A -inf logit (a banned token) has p = 0 and log p = -inf; its term must be 0, not 0 * -inf = NaN.
    # Replacing log p before the product (not masking after it) keeps the backward pass NaN-free too.
    log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    return -(probs * log_probs).sum(dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution at each position, (…, V) -> (…).

    ``H = -sum_v p_v log p_v`` with ``log p = logits - logsumexp(logits)`` (stable for large logits).
    float16/bfloat16 logits are upcast to float32 one slice of the leading dimension at a time, so
    the extra memory is one slice's float32 copy rather than the whole tensor's; the result is then
    float32. float32/float64 logits are used as they are.
    """
    if logits.dtype in LOW_PRECISION:
        if logits.dim() == 1:
            return _entropy(logits.float())
        if logits.shape[0] == 0:
            return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
        return torch.stack([_entropy(row.float()) for row in logits])
    return _entropy(logits)
