"""Types shared by every loss: what a loss returns, and the log-probs a preference loss reads."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LossOutput(NamedTuple):
    """What every loss function returns.

    loss: scalar, already reduced (normalised by the optimizer step's global item count where the
    caller passes one), ready for ``backward()``.
    metrics: detached scalars; the engine averages them over the optimizer step and logs them as named.
    """

    loss: Tensor
    metrics: dict[str, Tensor]


class PreferenceLogps(NamedTuple):
    """Sequence log-probabilities of one preference batch, every field of shape (B,).

    policy_*/ref_*: sum over response tokens of log pi(y_t | x, y_<t); ref_* is None for the
    reference-free losses (ORPO, SimPO, CPO), whose stage runs no reference.
    chosen_nll: mean per-token negative log-likelihood of the chosen response under the policy
    (used by RPO's NLL term); chosen_tokens/rejected_tokens: response lengths in tokens.
    weights: per-pair weights of the loss terms (WPO), detached; None = 1.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_nll: Tensor | None = None
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None
    weights: Tensor | None = None
