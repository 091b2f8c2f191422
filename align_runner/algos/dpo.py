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

Reference-free losses (ORPO, SimPO, CPO, the ``sft`` term) read no ``ref_*`` field; they carry
``reference_free = True`` so that a stage can tell (``needs_reference``) and run no reference pass.
``PreferenceLogps.weights`` (WPO, ``wpo_weights``) weighs every loss's per-pair terms.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(
            "this loss compares the policy with a reference, but PreferenceLogps has no ref_chosen / "
            "ref_rejected (the stage ran without a reference: algorithm.reference.stage is null)"
        )
    return logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected


def _lengths(logps: PreferenceLogps, loss: str) -> tuple[Tensor, Tensor]:
    """Response lengths (chosen, rejected) as the log-probs' dtype, at least 1 (an empty response
    would divide by zero; its zero log-prob stays zero)."""
    if logps.chosen_tokens is None or logps.rejected_tokens is None:
        raise ValueError(f"{loss} needs PreferenceLogps.chosen_tokens and rejected_tokens (length normalisation)")
    dtype = logps.policy_chosen.dtype
    return logps.chosen_tokens.clamp(min=1).to(dtype), logps.rejected_tokens.clamp(min=1).to(dtype)


def _nll(logps: PreferenceLogps, loss: str) -> Tensor:
    if logps.chosen_nll is None:
        raise ValueError(f"{loss} needs PreferenceLogps.chosen_nll")
    return logps.chosen_nll


def preference_metrics(logps: PreferenceLogps, beta: float) -> dict[str, Tensor]:
    """Metrics every preference loss reports, detached scalars.

    ``rewards/chosen`` = mean beta*a (DPO's implicit reward), ``rewards/rejected`` = mean beta*b,
    ``rewards/margins`` = mean beta*(a - b), ``rewards/accuracies`` = fraction with a > b,
    ``logps/chosen`` / ``logps/rejected`` = mean policy sequence log-probs.
    """
    a, b = _log_ratios(logps)
    return reward_metrics(beta * a, beta * b, logps)


def reward_metrics(chosen: Tensor, rejected: Tensor, logps: PreferenceLogps) -> dict[str, Tensor]:
    """``preference_metrics`` for any implicit reward (B,) of chosen and rejected: a reference-free
    loss reports its own (SimPO's length-normalised log-prob, ...)."""
    with torch.no_grad():
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": logps.policy_chosen.detach().float().mean(),
            "logps/rejected": logps.policy_rejected.detach().float().mean(),
        }


def _weighted_mean(losses: Tensor, logps: PreferenceLogps) -> Tensor:
    """Mean of the per-pair ``losses``, each times its ``logps.weights`` (WPO) when given."""
    return losses.mean() if logps.weights is None else (losses * logps.weights.detach()).mean()


def _output(losses: Tensor, logps: PreferenceLogps, beta: float) -> LossOutput:
    return LossOutput(_weighted_mean(losses, logps), preference_metrics(logps, beta))


def reference_free(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
    """Marks a loss that reads no ``ref_*`` field: its stage runs no reference pass."""
    fn.reference_free = True  # type: ignore[attr-defined]
    return fn


def needs_reference(loss: Any) -> bool:
    """Whether a configured loss (a ``_target_`` mapping, possibly a ``mixture_loss`` of several, or
    a callable) reads the reference's log-probs. Checked before any model loads."""
    if isinstance(loss, Mapping):
        if "losses" in loss:  # a mixture: any part that needs one
            return any(needs_reference(part) for part in loss["losses"])
        from hydra.utils import get_method

        loss = get_method(str(loss["_target_"]))
    while isinstance(loss, functools.partial):
        if "losses" in loss.keywords:
            return any(needs_reference(part) for part in loss.keywords["losses"])
        loss = loss.func
    return not getattr(loss, "reference_free", False)


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
    n_c, n_r = _lengths(logps, "ipo_loss")
    a, b = _log_ratios(logps)
    h = a / n_c - b / n_r
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
    nll = _nll(logps, "rpo_loss").mean()
    dpo = sigmoid_loss(logps, beta=beta)
    metrics = dict(dpo.metrics)
    metrics["nll_loss"] = nll.detach()
    return LossOutput(dpo.loss + alpha * nll, metrics)


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) log sigma(z) - eps log sigma(-z)``: DPO's term with cDPO label smoothing eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def aot_loss(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"): DPO's term on the sorted distributions instead of on each pair. With
    u = policy_chosen - policy_rejected and v = ref_chosen - ref_rejected over the batch,

        -log sigma(beta (sort(u)_i - sort(v)_i))     (cDPO smoothing as in ``sigmoid_loss``)

    The i-th smallest policy margin is compared with the i-th smallest reference margin: the policy's
    margin distribution must dominate the reference's (first-order stochastic dominance), not each pair.
    """
    _check(logps, beta)
    _check_smoothing(label_smoothing, 0.0, 0.5, closed_low=True)
    _log_ratios(logps)  # fails clearly without a reference
    u = logps.policy_chosen - logps.policy_rejected
    v = logps.ref_chosen - logps.ref_rejected
    delta = torch.sort(u).values - torch.sort(v).values
    return _output(_smoothed_sigmoid(beta * delta, label_smoothing), logps, beta)


def aot_unpaired_loss(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024): the sorted chosen log-ratios against the sorted rejected ones,
    ``-log sigma(beta (sort(a)_i - sort(b)_i))``: the distribution of chosen rewards must dominate that
    of rejected rewards, which needs no pairing of chosen with rejected."""
    _check(logps, beta)
    _check_smoothing(label_smoothing, 0.0, 0.5, closed_low=True)
    a, b = _log_ratios(logps)
    delta = torch.sort(a).values - torch.sort(b).values
    return _output(_smoothed_sigmoid(beta * delta, label_smoothing), logps, beta)


def discopop_loss(logps: PreferenceLogps, *, beta: float = 0.1, tau: float = 0.05) -> LossOutput:
    """DiscoPOP / LRML (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and
    for Large Language Models", eq. 5): with z = beta h and m = sigma(z / tau),

        (1 - m) * (-log sigma(z)) + m * exp(-z)

    a blend of DPO's logistic loss and an exponential loss, weighted by how large the margin already is.
    """
    _check(logps, beta)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    a, b = _log_ratios(logps)
    z = beta * (a - b)
    m = torch.sigmoid(z / tau)
    losses = (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
    return _output(losses, logps, beta)


def sigmoid_norm_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Length-normalised DPO: ``-log sigma(beta (a / n_c - b / n_r))``, each log-ratio divided by its
    response's token count, so a long response does not get a larger reward for its length alone."""
    _check(logps, beta)
    n_c, n_r = _lengths(logps, "sigmoid_norm_loss")
    a, b = _log_ratios(logps)
    return _output(-F.logsigmoid(beta * (a / n_c - b / n_r)), logps, beta)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(log_ratio: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """f'(t) at t = pi / pi_ref = exp(log_ratio), for the f-divergence regularisers of f-DPO (Wang et al.
    2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", table 1):

        reverse_kl        log t                      (standard DPO)
        forward_kl        1 - 1/t
        js_divergence     log(2t / (1 + t)) = log 2 + log sigma(log t)
        alpha_divergence  (1 - t^(-alpha)) / alpha,   alpha in (0, 1)

    The alpha-divergence runs from reverse KL (alpha -> 0) to forward KL (alpha -> 1); TRL's
    ``f_alpha_divergence_coef`` is 1 - alpha in this (the paper's) parametrisation.
    """
    if divergence == "reverse_kl":
        return log_ratio
    if divergence == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if divergence == "alpha_divergence":
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1) for the alpha-divergence, got {alpha}")
        return (1 - torch.exp(-alpha * log_ratio)) / alpha
    raise ValueError(f"unknown divergence {divergence!r}; one of {', '.join(F_DIVERGENCES)}")


def f_divergence_loss(
    logps: PreferenceLogps, *, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 0.5
) -> LossOutput:
    """f-DPO (Wang et al. 2023): DPO with the reverse-KL constraint replaced by another f-divergence,
    ``-log sigma(beta (f'(t_c) - f'(t_r)))`` with t = pi / pi_ref of each response
    (``f_divergence_scores``); ``divergence="reverse_kl"`` is ``sigmoid_loss``."""
    _check(logps, beta)
    a, b = _log_ratios(logps)
    z = beta * (f_divergence_scores(a, divergence, alpha) - f_divergence_scores(b, divergence, alpha))
    return _output(-F.logsigmoid(z), logps, beta)


@reference_free
def sft_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """The chosen responses' NLL alone, ``mean(chosen_nll)`` (per-token mean per response): the SFT term
    of a ``mixture_loss`` (e.g. DPO + SFT as in RPO). beta only scales the reported rewards."""
    nll = _nll(logps, "sft_loss")
    return LossOutput(_weighted_mean(nll, logps), {"nll_loss": nll.detach().mean()})


# ------------------------------------------------------------------------- reference-free losses


def _mean_logps(logps: PreferenceLogps, loss: str) -> tuple[Tensor, Tensor]:
    """The policy's length-normalised (per-token mean) log-probs of chosen and rejected."""
    n_c, n_r = _lengths(logps, loss)
    return logps.policy_chosen / n_c, logps.policy_rejected / n_r


@reference_free
def orpo_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eq. 6-7): ``chosen_nll + beta * -log sigma(log odds(y_c) - log odds(y_r))``, beta being the paper's
    lambda. P(y) = exp(mean token log-prob) and odds(y) = P / (1 - P), so

        log odds(y) = m - log(1 - exp(m)),   m = policy log-prob / tokens

    Metrics: rewards = beta * m (the length-normalised log-prob), ``log_odds_ratio``, ``nll_loss``.
    """
    _check(logps, beta)
    nll = _nll(logps, "orpo_loss")
    m_c, m_r = _mean_logps(logps, "orpo_loss")

    def log_odds(m: Tensor) -> Tensor:
        # m = 0 (probability 1) has infinite odds; keep it just below so the loss stays finite
        m = m.clamp(max=-1e-6)
        return m - torch.log(-torch.expm1(m))

    ratio = log_odds(m_c) - log_odds(m_r)
    losses = nll - beta * F.logsigmoid(ratio)
    metrics = reward_metrics(beta * m_c, beta * m_r, logps)
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["nll_loss"] = nll.detach().mean()
    return LossOutput(_weighted_mean(losses, logps), metrics)


@reference_free
def simpo_loss(logps: PreferenceLogps, *, beta: float = 2.0, gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6): the reward is the length-normalised log-prob r(y) = beta * m(y), m = log-prob / tokens, and
    the chosen reward must beat the rejected one by the target margin gamma:

        -log sigma(beta m_c - beta m_r - gamma)

    (TRL's CPO trainer takes gamma / beta as ``simpo_gamma``.) No reference, no NLL term.
    """
    _check(logps, beta)
    m_c, m_r = _mean_logps(logps, "simpo_loss")
    r_c, r_r = beta * m_c, beta * m_r
    losses = -F.logsigmoid(r_c - r_r - gamma)
    return LossOutput(_weighted_mean(losses, logps), reward_metrics(r_c, r_r, logps))


CPO_TYPES = ("sigmoid", "hinge", "ipo")


@reference_free
def cpo_loss(
    logps: PreferenceLogps, *, beta: float = 0.1, alpha: float = 1.0, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation", eq. 3-4): a DPO-like preference term with the reference
    dropped (a uniform reference), plus ``alpha`` times the chosen NLL. With u = policy_chosen -
    policy_rejected:

        sigmoid  -(1 - eps) log sigma(beta u) - eps log sigma(-beta u)   (the paper's)
        hinge    relu(1 - beta u)
        ipo      (u - 1/(2 beta))^2

    Metrics: rewards = beta * sequence log-prob, ``nll_loss``.
    """
    _check(logps, beta)
    if loss_type not in CPO_TYPES:
        raise ValueError(f"cpo_loss loss_type must be one of {', '.join(CPO_TYPES)}, got {loss_type!r}")
    _check_smoothing(label_smoothing, 0.0, 0.5, closed_low=True)
    nll = _nll(logps, "cpo_loss")
    u = logps.policy_chosen - logps.policy_rejected
    if loss_type == "sigmoid":
        pref = _smoothed_sigmoid(beta * u, label_smoothing)
    elif loss_type == "hinge":
        pref = torch.relu(1 - beta * u)
    else:
        pref = (u - 1 / (2 * beta)) ** 2
    metrics = reward_metrics(beta * logps.policy_chosen, beta * logps.policy_rejected, logps)
    metrics["nll_loss"] = nll.detach().mean()
    return LossOutput(_weighted_mean(pref + alpha * nll, logps), metrics)


# ------------------------------------------------------------------- what a stage does to log-probs


def wpo_weights(policy_chosen_mean: Tensor, policy_rejected_mean: Tensor) -> Tensor:
    """WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", eq. 2): each
    pair weighs exp(m_c) * exp(m_r), m being the policy's own length-normalised (per-token mean)
    log-prob of the response, detached: pairs the current policy would likely generate count more,
    simulating on-policy data with off-policy pairs. The result goes into ``PreferenceLogps.weights``."""
    return torch.exp(policy_chosen_mean.detach() + policy_rejected_mean.detach())


def length_desensitised(full: Tensor, public: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", eq. 9):
    a response's log-prob with the tokens past the shorter response of its pair down-weighted,

        public + ld_alpha * (full - public)

    where ``public`` sums the first min(len_c, len_r) tokens' log-probs and ``full`` all of them;
    ld_alpha = 1 is plain DPO, smaller values reduce the verbosity the longer response is rewarded for.
    """
    if not 0 <= ld_alpha <= 1:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    return public + ld_alpha * (full - public)


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
