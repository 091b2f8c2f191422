"""The DPO loss family: offline preference losses over sequence log-probs of a policy and a reference.

Every loss has the signature ``fn(logps: PreferenceLogps, *, beta=0.1, <own params>) -> LossOutput``,
returns the mean over the batch, and adds the same metrics (see ``preference_metrics``). Notation used
in the docstrings, all of shape (B,):

    a = policy_chosen - ref_chosen          (chosen log-ratio)
    b = policy_rejected - ref_rejected      (rejected log-ratio)
    h = a - b                               (log-ratio difference)
    sigma = logistic sigmoid; log sigma is computed with ``F.logsigmoid`` for stability.

Hydra builds a configured loss as a partial: ``{_target_: align_runner.algos.dpo.ipo_loss,
_partial_: true, beta: 0.5}``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from align_runner.algos.types import LossOutput, PreferenceLogps

PreferenceLoss = Callable[[PreferenceLogps], LossOutput]


# ----------------------------------------------------------------------------------------- helpers


def _check(logps: PreferenceLogps, beta: float) -> None:
    """Fail early on shapes that would broadcast silently into a wrong loss, and on beta <= 0."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shape = logps.policy_chosen.shape
    if len(shape) != 1:
        raise ValueError(f"preference log-probs must have shape (B,), got {tuple(shape)}")
    for name, value in logps._asdict().items():
        if value is not None and value.shape != shape:
            raise ValueError(
                f"PreferenceLogps.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )


def _check_smoothing(eps: float, low: float, high: float, *, closed_low: bool) -> None:
    ok = (low <= eps if closed_low else low < eps) and eps < high
    if not ok:
        bracket = "[" if closed_low else "("
        raise ValueError(f"label_smoothing must be in {bracket}{low}, {high}), got {eps}")


def _log_ratios(logps: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """(a, b): policy-minus-reference log-ratios of chosen and rejected, (B,) each."""
    return logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected


def preference_metrics(logps: PreferenceLogps, beta: float) -> dict[str, Tensor]:
    """Metrics every preference loss reports, detached scalars.

    ``rewards/chosen`` = mean beta*a (DPO's implicit reward), ``rewards/rejected`` = mean beta*b,
    ``rewards/margins`` = mean beta*(a - b), ``rewards/accuracies`` = fraction with a > b,
    ``logps/chosen`` / ``logps/rejected`` = mean policy sequence log-probs.
    """
    with torch.no_grad():
        a, b = _log_ratios(logps)
        chosen, rejected = beta * a.float(), beta * b.float()
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": logps.policy_chosen.float().mean(),
            "logps/rejected": logps.policy_rejected.float().mean(),
        }


def _output(losses: Tensor, logps: PreferenceLogps, beta: float) -> LossOutput:
    return LossOutput(losses.mean(), preference_metrics(logps, beta))


# ------------------------------------------------------------------------------------------ losses


def sigmoid_loss(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7): ``-log sigma(beta h)``.

    With ``label_smoothing`` eps > 0 this is conservative DPO (cDPO; Mitchell 2023, "A note on DPO
    with noisy preferences"): each label is assumed flipped with probability eps, giving
    ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``. eps must be in [0, 0.5).
    """
    _check(logps, beta)
    _check_smoothing(label_smoothing, 0.0, 0.5, closed_low=True)
    a, b = _log_ratios(logps)
    z = beta * (a - b)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return _output(losses, logps, beta)


def robust_loss(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """rDPO (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased loss under label noise eps.

    ``(-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)``; eps in [0, 0.5)
    (at 0.5 the labels carry no information and the debiasing divides by zero).
    """
    _check(logps, beta)
    _check_smoothing(label_smoothing, 0.0, 0.5, closed_low=True)
    a, b = _log_ratios(logps)
    z = beta * (a - b)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _output(losses, logps, beta)


def ipo_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences"): ``(h - 1/(2 beta))^2`` with beta playing the role of the paper's tau.

    The log-probs are length-averaged first (each sequence log-prob divided by its token count), so
    ``logps.chosen_tokens`` and ``logps.rejected_tokens`` are required. The regression target keeps
    the margin finite, unlike DPO, which keeps pushing h up on deterministic preferences.
    """
    _check(logps, beta)
    if logps.chosen_tokens is None or logps.rejected_tokens is None:
        raise ValueError(
            "ipo_loss needs PreferenceLogps.chosen_tokens and rejected_tokens (length averaging)"
        )
    # clamp: an empty response would divide by zero; its (zero) log-prob stays zero.
    n_c = logps.chosen_tokens.clamp(min=1).to(logps.policy_chosen.dtype)
    n_r = logps.rejected_tokens.clamp(min=1).to(logps.policy_rejected.dtype)
    h = (logps.policy_chosen - logps.ref_chosen) / n_c - (logps.policy_rejected - logps.ref_rejected) / n_r
    losses = (h - 1 / (2 * beta)) ** 2
    return _output(losses, logps, beta)


def hinge_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"),
    calibration term on reference-normalised log-probs: ``relu(1 - beta h)``.
    """
    _check(logps, beta)
    a, b = _log_ratios(logps)
    losses = torch.relu(1 - beta * (a - b))
    return _output(losses, logps, beta)


def exo_loss(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO, pairwise form (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment"): the reverse KL from the model's pair distribution p = (sigma(beta h), sigma(-beta h))
    to the smoothed label distribution (1 - eps, eps):

        sigma(beta h) (log sigma(beta h) - log(1 - eps)) + sigma(-beta h) (log sigma(-beta h) - log eps)

    eps (``label_smoothing``) must be in (0, 1): log eps is undefined at 0. Reverse KL is
    mode-seeking, which is the paper's argument against DPO's forward-KL behaviour.
    """
    _check(logps, beta)
    _check_smoothing(label_smoothing, 0.0, 1.0, closed_low=False)
    a, b = _log_ratios(logps)
    z = beta * (a - b)
    log_p, log_q = F.logsigmoid(z), F.logsigmoid(-z)
    eps = label_smoothing
    losses = log_p.exp() * (log_p - math.log1p(-eps)) + log_q.exp() * (log_q - math.log(eps))
    return _output(losses, logps, beta)


def nca_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """NCA, pairwise form (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards"), with r_c = beta a, r_r = beta b:

        -log sigma(r_c) - 1/2 log sigma(-r_c) - 1/2 log sigma(-r_r)

    Each response's own reward is optimised (not only the difference), so the chosen likelihood is
    not driven down the way it can be under DPO.
    """
    _check(logps, beta)
    a, b = _log_ratios(logps)
    r_c, r_r = beta * a, beta * b
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return _output(losses, logps, beta)


def bco_pair_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """BCO, pairwise form (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment"), with r_c = beta a, r_r = beta b and reward shift delta:

        -log sigma(r_c - delta) - log sigma(-(r_r - delta))

    The paper's delta is a running mean of the rewards over training; here delta is a per-batch
    estimate, the mean of the concatenated (r_c, r_r) of this batch, detached (it is a baseline,
    not something to optimise). A stage that wants the running mean can keep one and shift the
    log-ratios itself.
    """
    _check(logps, beta)
    a, b = _log_ratios(logps)
    r_c, r_r = beta * a, beta * b
    delta = torch.cat([r_c, r_r]).mean().detach()
    losses = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    return _output(losses, logps, beta)


def sppo_hard_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model
    Alignment"): the winner's log-ratio regresses to +1/(2 beta), the loser's to -1/(2 beta):

        (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2

    (the paper's win probabilities 1 and 0 in place of estimated ones, eta = 1/beta).
    """
    _check(logps, beta)
    a, b = _log_ratios(logps)
    target = 1 / (2 * beta)
    losses = (a - target) ** 2 + (b + target) ** 2
    return _output(losses, logps, beta)


def apo_zero_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions"): ``1 - sigma(beta a) + sigma(beta b)``.

    Anchored: pushes the chosen likelihood up and the rejected down independently; suited when the
    chosen responses are better than the current policy's outputs.
    """
    _check(logps, beta)
    a, b = _log_ratios(logps)
    losses = 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
    return _output(losses, logps, beta)


def apo_down_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024): ``sigma(beta a) + 1 - sigma(beta (a - b))``.

    Pushes the chosen likelihood down while widening the chosen-rejected gap; suited when the
    chosen responses are worse than the current policy's outputs.
    """
    _check(logps, beta)
    a, b = _log_ratios(logps)
    losses = torch.sigmoid(beta * a) + 1 - torch.sigmoid(beta * (a - b))
    return _output(losses, logps, beta)


def rpo_loss(logps: PreferenceLogps, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): DPO plus an NLL term on
    the chosen response, ``-log sigma(beta h) + alpha * chosen_nll``.

    ``logps.chosen_nll`` (mean per-token NLL of the chosen response under the policy) is required;
    the paper normalises the NLL by length, which is what that field holds. Extra metric: ``nll_loss``.
    """
    _check(logps, beta)
    if logps.chosen_nll is None:
        raise ValueError("rpo_loss needs PreferenceLogps.chosen_nll")
    dpo = sigmoid_loss(logps, beta=beta)
    nll = logps.chosen_nll.mean()
    metrics = dict(dpo.metrics)
    metrics["nll_loss"] = nll.detach()
    return LossOutput(dpo.loss + alpha * nll, metrics)


def _loss_name(fn: Callable[..., object]) -> str:
    """The underlying function's name, looking through (nested) functools.partial."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def mixture_loss(
    logps: PreferenceLogps,
    *,
    losses: Sequence[PreferenceLoss],
    weights: Sequence[float] | None = None,
) -> LossOutput:
    """Weighted sum of several preference losses, e.g. DPO + BCO as in MPO (Wang et al. 2024).

    losses: callables taking only ``logps``, typically ``functools.partial(ipo_loss, beta=0.5)``.
    weights: one per loss; None means 1.0 each. Metrics of every part are kept, prefixed with the
    function name (``sigmoid_loss/rewards/margins``; a repeated name gets ``_2``, ``_3``...), plus
    ``<name>/loss`` with each part's unweighted value.
    """
    if not losses:
        raise ValueError("mixture_loss needs at least one loss")
    if weights is None:
        weights = [1.0] * len(losses)
    if len(weights) != len(losses):
        raise ValueError(f"mixture_loss got {len(losses)} losses but {len(weights)} weights")
    total: Tensor | None = None
    metrics: dict[str, Tensor] = {}
    seen: dict[str, int] = {}
    for fn, weight in zip(losses, weights):
        name = _loss_name(fn)
        seen[name] = seen.get(name, 0) + 1
        prefix = name if seen[name] == 1 else f"{name}_{seen[name]}"
        part = fn(logps)
        total = weight * part.loss if total is None else total + weight * part.loss
        metrics[f"{prefix}/loss"] = part.loss.detach()
        metrics.update({f"{prefix}/{key}": value for key, value in part.metrics.items()})
    assert total is not None  # losses is non-empty
    return LossOutput(total, metrics)
