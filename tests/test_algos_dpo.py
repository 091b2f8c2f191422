"""DPO loss family: every loss against a value worked out by hand, gradient signs, metrics, errors.

Shared batch of 2 pairs (binary-exact numbers):
    policy_chosen = [-10, -8],    ref_chosen   = [-11, -8.5]   -> a = [1.0, 0.5]
    policy_rejected = [-12, -7.75], ref_rejected = [-11.5, -7.5] -> b = [-0.5, -0.25]
    h = a - b = [1.5, 0.75]
    chosen_tokens = [4, 2], rejected_tokens = [5, 1], chosen_nll = [0.5, 1.5]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch

from align_runner.algos import dpo
from align_runner.algos.types import LossOutput, PreferenceLogps

A = [1.0, 0.5]
B = [-0.5, -0.25]
H = [1.5, 0.75]


def _batch(requires_grad: bool = False, **overrides: torch.Tensor | None) -> PreferenceLogps:
    def t(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)

    fields = {
        "policy_chosen": t([-10.0, -8.0]),
        "policy_rejected": t([-12.0, -7.75]),
        "ref_chosen": torch.tensor([-11.0, -8.5], dtype=torch.float64),
        "ref_rejected": torch.tensor([-11.5, -7.5], dtype=torch.float64),
        "chosen_nll": torch.tensor([0.5, 1.5], dtype=torch.float64),
        "chosen_tokens": torch.tensor([4, 2]),
        "rejected_tokens": torch.tensor([5, 1]),
    }
    fields.update(overrides)
    return PreferenceLogps(**fields)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _check(out: LossOutput, expected: float) -> None:
    assert out.loss.dim() == 0
    assert out.loss.item() == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------ values by hand


def test_sigmoid_by_hand() -> None:
    # beta=0.1: beta*h = [0.15, 0.075]; -log sigma(0.15) = 0.62096, -log sigma(0.075) = 0.65583
    _check(dpo.sigmoid_loss(_batch(), beta=0.1), _mean([-_logsig(0.15), -_logsig(0.075)]))


def test_conservative_dpo_by_hand() -> None:
    # eps=0.1: 0.9 * -log sigma(z) + 0.1 * -log sigma(-z), z = [0.15, 0.075]
    expected = _mean([-0.9 * _logsig(z) - 0.1 * _logsig(-z) for z in (0.15, 0.075)])
    _check(dpo.sigmoid_loss(_batch(), beta=0.1, label_smoothing=0.1), expected)


def test_robust_by_hand() -> None:
    # eps=0.1: (-0.9 log sigma(z) + 0.1 log sigma(-z)) / 0.8, z = [0.15, 0.075]
    expected = _mean([(-0.9 * _logsig(z) + 0.1 * _logsig(-z)) / 0.8 for z in (0.15, 0.075)])
    _check(dpo.robust_loss(_batch(), beta=0.1, label_smoothing=0.1), expected)
    # eps=0 is plain DPO
    _check(dpo.robust_loss(_batch(), beta=0.1), _mean([-_logsig(0.15), -_logsig(0.075)]))


def test_ipo_by_hand() -> None:
    # length-averaged: a' = [1/4, 0.5/2] = [0.25, 0.25], b' = [-0.5/5, -0.25/1] = [-0.1, -0.25]
    # h' = [0.35, 0.5]; beta=0.5 -> target 1/(2*0.5) = 1
    # (0.35 - 1)^2 = 0.4225, (0.5 - 1)^2 = 0.25 -> mean 0.33625
    _check(dpo.ipo_loss(_batch(), beta=0.5), (0.4225 + 0.25) / 2)


def test_hinge_by_hand() -> None:
    # beta=1: beta*h = [1.5, 0.75] -> relu(1 - 1.5) = 0, relu(1 - 0.75) = 0.25 -> mean 0.125
    _check(dpo.hinge_loss(_batch(), beta=1.0), 0.125)
    # beta=0.1: [relu(0.85), relu(0.925)] -> 0.8875
    _check(dpo.hinge_loss(_batch(), beta=0.1), (0.85 + 0.925) / 2)


def test_exo_by_hand() -> None:
    # eps=1e-3, z = beta*h = [0.15, 0.075]:
    # sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps)
    eps = 1e-3

    def one(z: float) -> float:
        return _sig(z) * (_logsig(z) - math.log(1 - eps)) + _sig(-z) * (_logsig(-z) - math.log(eps))

    _check(dpo.exo_loss(_batch(), beta=0.1), _mean([one(0.15), one(0.075)]))


def test_nca_by_hand() -> None:
    # r_c = 0.1 * a = [0.1, 0.05], r_r = 0.1 * b = [-0.05, -0.025]
    def one(rc: float, rr: float) -> float:
        return -_logsig(rc) - 0.5 * _logsig(-rc) - 0.5 * _logsig(-rr)

    _check(dpo.nca_loss(_batch(), beta=0.1), _mean([one(0.1, -0.05), one(0.05, -0.025)]))


def test_bco_pair_by_hand() -> None:
    # r_c = [0.1, 0.05], r_r = [-0.05, -0.025]; delta = (0.1 + 0.05 - 0.05 - 0.025) / 4 = 0.01875
    delta = 0.01875

    def one(rc: float, rr: float) -> float:
        return -_logsig(rc - delta) - _logsig(-(rr - delta))

    _check(dpo.bco_pair_loss(_batch(), beta=0.1), _mean([one(0.1, -0.05), one(0.05, -0.025)]))


def test_sppo_hard_by_hand() -> None:
    # beta=0.5 -> 1/(2 beta) = 1
    # pair 1: (1 - 1)^2 + (-0.5 + 1)^2 = 0.25; pair 2: (0.5 - 1)^2 + (-0.25 + 1)^2 = 0.8125
    _check(dpo.sppo_hard_loss(_batch(), beta=0.5), (0.25 + 0.8125) / 2)


def test_apo_zero_by_hand() -> None:
    # 1 - sigma(0.1 a) + sigma(0.1 b): a = [1, 0.5], b = [-0.5, -0.25]
    expected = _mean([1 - _sig(0.1) + _sig(-0.05), 1 - _sig(0.05) + _sig(-0.025)])
    _check(dpo.apo_zero_loss(_batch(), beta=0.1), expected)


def test_apo_down_by_hand() -> None:
    # sigma(0.1 a) + 1 - sigma(0.1 h): a = [1, 0.5], h = [1.5, 0.75]
    expected = _mean([_sig(0.1) + 1 - _sig(0.15), _sig(0.05) + 1 - _sig(0.075)])
    _check(dpo.apo_down_loss(_batch(), beta=0.1), expected)


def test_rpo_by_hand() -> None:
    # DPO part as in test_sigmoid_by_hand, plus alpha * mean(chosen_nll) = 0.5 * mean(0.5, 1.5) = 0.5
    out = dpo.rpo_loss(_batch(), beta=0.1, alpha=0.5)
    _check(out, _mean([-_logsig(0.15), -_logsig(0.075)]) + 0.5)
    assert out.metrics["nll_loss"].item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------- mixture


def test_mixture_is_the_weighted_sum() -> None:
    parts = [functools.partial(dpo.sigmoid_loss, beta=0.1), functools.partial(dpo.hinge_loss, beta=1.0)]
    out = dpo.mixture_loss(_batch(), losses=parts, weights=[0.3, 2.0])
    sigmoid = _mean([-_logsig(0.15), -_logsig(0.075)])
    _check(out, 0.3 * sigmoid + 2.0 * 0.125)
    assert out.metrics["sigmoid_loss/loss"].item() == pytest.approx(sigmoid)
    assert out.metrics["hinge_loss/loss"].item() == pytest.approx(0.125)
    # each part's metrics kept under its own name, with its own beta
    assert out.metrics["sigmoid_loss/rewards/margins"].item() == pytest.approx(0.1 * _mean(H))
    assert out.metrics["hinge_loss/rewards/margins"].item() == pytest.approx(1.0 * _mean(H))


def test_mixture_default_weights_and_repeated_names() -> None:
    parts = [functools.partial(dpo.sigmoid_loss, beta=0.1), functools.partial(dpo.sigmoid_loss, beta=1.0)]
    out = dpo.mixture_loss(_batch(), losses=parts)
    expected = _mean([-_logsig(0.15), -_logsig(0.075)]) + _mean([-_logsig(1.5), -_logsig(0.75)])
    _check(out, expected)
    assert "sigmoid_loss/loss" in out.metrics and "sigmoid_loss_2/loss" in out.metrics


def test_mixture_errors() -> None:
    parts = [dpo.sigmoid_loss, dpo.hinge_loss]
    with pytest.raises(ValueError, match="weights"):
        dpo.mixture_loss(_batch(), losses=parts, weights=[1.0])
    with pytest.raises(ValueError, match="at least one"):
        dpo.mixture_loss(_batch(), losses=[])


# ---------------------------------------------------------------------------- gradients


ALL_LOSSES: dict[str, Callable[[PreferenceLogps], LossOutput]] = {
    "sigmoid": dpo.sigmoid_loss,
    "cdpo": functools.partial(dpo.sigmoid_loss, label_smoothing=0.1),
    "robust": functools.partial(dpo.robust_loss, label_smoothing=0.1),
    "ipo": dpo.ipo_loss,
    "hinge": dpo.hinge_loss,
    "exo": dpo.exo_loss,
    "nca": dpo.nca_loss,
    "bco_pair": dpo.bco_pair_loss,
    "sppo_hard": dpo.sppo_hard_loss,
    "apo_zero": dpo.apo_zero_loss,
    "apo_down": dpo.apo_down_loss,
    "rpo": dpo.rpo_loss,
    "mixture": functools.partial(dpo.mixture_loss, losses=[dpo.sigmoid_loss, dpo.bco_pair_loss]),
    "aot": dpo.aot_loss,
    "aot_unpaired": dpo.aot_unpaired_loss,
    "discopop": dpo.discopop_loss,
    "sigmoid_norm": dpo.sigmoid_norm_loss,
    "forward_kl": functools.partial(dpo.f_divergence_loss, divergence="forward_kl"),
    "js_divergence": functools.partial(dpo.f_divergence_loss, divergence="js_divergence"),
    "alpha_divergence": functools.partial(dpo.f_divergence_loss, divergence="alpha_divergence"),
}


def _grads(fn: Callable[[PreferenceLogps], LossOutput]) -> tuple[torch.Tensor, torch.Tensor]:
    logps = _batch(requires_grad=True)
    out = fn(logps)
    grad_c, grad_r = torch.autograd.grad(out.loss, (logps.policy_chosen, logps.policy_rejected))
    return grad_c, grad_r


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_gradient_lowers_rejected(name: str) -> None:
    # Raising the rejected log-prob must raise every loss (all are at default beta=0.1, where
    # hinge is still active and IPO/SPPO are below their targets).
    _, grad_r = _grads(ALL_LOSSES[name])
    assert (grad_r > 0).all()


@pytest.mark.parametrize("name", sorted(set(ALL_LOSSES) - {"apo_down"}))
def test_gradient_raises_chosen(name: str) -> None:
    grad_c, _ = _grads(ALL_LOSSES[name])
    assert (grad_c < 0).all()


def test_apo_down_pushes_chosen_down() -> None:
    # APO-down's point: d/da [sigma(beta a) - sigma(beta h)] = beta (sigma'(beta a) - sigma'(beta h)) > 0
    # here since 0 < beta a < beta h and sigma' falls on x > 0; the chosen likelihood is lowered.
    grad_c, _ = _grads(dpo.apo_down_loss)
    assert (grad_c > 0).all()


def test_hinge_is_flat_past_the_margin() -> None:
    # beta=1: pair 1 has beta h = 1.5 > 1 -> zero gradient; pair 2 (0.75) -> -beta / B = -0.5
    grad_c, _ = _grads(functools.partial(dpo.hinge_loss, beta=1.0))
    assert grad_c.tolist() == pytest.approx([0.0, -0.5])


def test_bco_delta_is_detached() -> None:
    # With delta detached, d loss / d policy_chosen[i] = -beta * sigma(-(r_c - delta)) / B exactly.
    grad_c, _ = _grads(dpo.bco_pair_loss)
    expected = [-0.1 * _sig(-(rc - 0.01875)) / 2 for rc in (0.1, 0.05)]
    assert grad_c.tolist() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("name", sorted(set(ALL_LOSSES) - {"mixture"}))
def test_shared_metrics(name: str) -> None:
    out = ALL_LOSSES[name](_batch(requires_grad=True))
    m = out.metrics
    # beta=0.1: rewards/chosen = 0.1 * mean(1, 0.5) = 0.075; rejected = 0.1 * mean(-0.5, -0.25) = -0.0375
    assert m["rewards/chosen"].item() == pytest.approx(0.075)
    assert m["rewards/rejected"].item() == pytest.approx(-0.0375)
    assert m["rewards/margins"].item() == pytest.approx(0.1125)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == pytest.approx(-9.0)
    assert m["logps/rejected"].item() == pytest.approx(-9.875)
    assert all(not v.requires_grad for v in m.values())


def test_accuracy_counts_pairs_where_chosen_wins() -> None:
    # Swap the second pair's chosen and rejected: only pair 1 is ranked right.
    logps = _batch(
        policy_chosen=torch.tensor([-10.0, -7.75]),
        policy_rejected=torch.tensor([-12.0, -8.0]),
        ref_chosen=torch.tensor([-11.0, -7.5]),
        ref_rejected=torch.tensor([-11.5, -8.5]),
    )
    assert dpo.sigmoid_loss(logps).metrics["rewards/accuracies"].item() == 0.5


# ---------------------------------------------------------------------------- errors


def test_robust_rejects_half_smoothing() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.robust_loss(_batch(), label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.robust_loss(_batch(), label_smoothing=-0.1)


def test_sigmoid_and_exo_reject_bad_smoothing() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.sigmoid_loss(_batch(), label_smoothing=0.7)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.exo_loss(_batch(), label_smoothing=0.0)


def test_ipo_needs_token_counts() -> None:
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo.ipo_loss(_batch(chosen_tokens=None))
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo.ipo_loss(_batch(rejected_tokens=None))


def test_rpo_needs_chosen_nll() -> None:
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo.rpo_loss(_batch(chosen_nll=None))


@pytest.mark.parametrize("name", sorted(set(ALL_LOSSES) - {"mixture"}))
def test_non_positive_beta_raises(name: str) -> None:
    with pytest.raises(ValueError, match="beta"):
        ALL_LOSSES[name](_batch(), beta=0.0)


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match="ref_rejected"):
        dpo.sigmoid_loss(_batch(ref_rejected=torch.zeros(3)))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo.sigmoid_loss(
            PreferenceLogps(*(torch.zeros(2, 1) for _ in range(4)))  # (B, 1) would broadcast silently
        )


# ------------------------------------------------------------------ DPO variants (issue 14)


def _sorting_batch() -> PreferenceLogps:
    # a batch where sorting changes the pairing (AOT): policy/ref chosen and rejected
    #   u = pc - pr = [2, -2], v = rc - rr = [0, 3]; a = pc - rc = [1, -1], b = pr - rr = [-1, 4]
    return _batch(
        policy_chosen=torch.tensor([-1.0, -4.0], dtype=torch.float64),
        policy_rejected=torch.tensor([-3.0, -2.0], dtype=torch.float64),
        ref_chosen=torch.tensor([-2.0, -3.0], dtype=torch.float64),
        ref_rejected=torch.tensor([-2.0, -6.0], dtype=torch.float64),
    )


def test_aot_compares_sorted_margins() -> None:
    # sort(u) = [-2, 2], sort(v) = [0, 3] -> delta = [-2, -1]; beta=1
    # (per-pair DPO would use h = a - b = [2, -5] instead)
    _check(dpo.aot_loss(_sorting_batch(), beta=1.0), _mean([-_logsig(-2.0), -_logsig(-1.0)]))
    # label smoothing 0.1: 0.9 * -log sigma(delta) + 0.1 * -log sigma(-delta)
    expected = _mean([-0.9 * _logsig(d) - 0.1 * _logsig(-d) for d in (-2.0, -1.0)])
    _check(dpo.aot_loss(_sorting_batch(), beta=1.0, label_smoothing=0.1), expected)


def test_aot_unpaired_compares_sorted_log_ratios() -> None:
    # sort(a) = [-1, 1], sort(b) = [-1, 4] -> delta = [0, -3]; beta=1
    _check(dpo.aot_unpaired_loss(_sorting_batch(), beta=1.0), _mean([math.log(2), -_logsig(-3.0)]))


def test_discopop_by_hand() -> None:
    # z = beta h = [0.15, 0.075]; tau = 0.05 -> m = sigma(z / tau) = [sigma(3), sigma(1.5)]
    # loss = (1 - m) * -log sigma(z) + m * exp(-z)
    def one(z: float) -> float:
        m = _sig(z / 0.05)
        return (1 - m) * -_logsig(z) + m * math.exp(-z)

    _check(dpo.discopop_loss(_batch(), beta=0.1, tau=0.05), _mean([one(0.15), one(0.075)]))
    with pytest.raises(ValueError, match="tau"):
        dpo.discopop_loss(_batch(), tau=0.0)


def test_sigmoid_norm_by_hand() -> None:
    # a / n_c = [1/4, 0.5/2] = [0.25, 0.25]; b / n_r = [-0.5/5, -0.25/1] = [-0.1, -0.25]
    # difference [0.35, 0.5]; beta=1 -> -log sigma(0.35), -log sigma(0.5)
    _check(dpo.sigmoid_norm_loss(_batch(), beta=1.0), _mean([-_logsig(0.35), -_logsig(0.5)]))


def test_f_divergences_by_hand() -> None:
    # a = [1, 0.5], b = [-0.5, -0.25]; beta = 0.1; loss = -log sigma(beta (f'(t_c) - f'(t_r)))
    def loss(diffs: list[float]) -> float:
        return _mean([-_logsig(0.1 * d) for d in diffs])

    # reverse KL: f'(t) = log t -> a - b = h: plain DPO
    _check(dpo.f_divergence_loss(_batch(), divergence="reverse_kl"), loss(H))
    # forward KL: f'(t) = 1 - 1/t -> (1 - e^-a) - (1 - e^-b) = e^-b - e^-a
    forward = [math.exp(0.5) - math.exp(-1.0), math.exp(0.25) - math.exp(-0.5)]
    _check(dpo.f_divergence_loss(_batch(), divergence="forward_kl"), loss(forward))
    # JS: f'(t) = log 2 + log sigma(log t) -> log sigma(a) - log sigma(b)
    js = [_logsig(1.0) - _logsig(-0.5), _logsig(0.5) - _logsig(-0.25)]
    _check(dpo.f_divergence_loss(_batch(), divergence="js_divergence"), loss(js))
    # alpha = 0.5: f'(t) = (1 - t^-0.5) / 0.5 -> 2 (e^(-0.5 b) - e^(-0.5 a))
    alpha = [2 * (math.exp(0.25) - math.exp(-0.5)), 2 * (math.exp(0.125) - math.exp(-0.25))]
    _check(dpo.f_divergence_loss(_batch(), divergence="alpha_divergence", alpha=0.5), loss(alpha))
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        dpo.f_divergence_loss(_batch(), divergence="kl")
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        dpo.f_divergence_loss(_batch(), divergence="alpha_divergence", alpha=1.0)


def test_wpo_weights_scale_each_pair() -> None:
    # per-token means m_c = pc / n_c = [-10/4, -8/2] = [-2.5, -4], m_r = pr / n_r = [-12/5, -7.75/1] = [-2.4, -7.75]
    # weight = exp(m_c + m_r) = [exp(-4.9), exp(-11.75)]
    weights = dpo.wpo_weights(torch.tensor([-2.5, -4.0], dtype=torch.float64), torch.tensor([-2.4, -7.75], dtype=torch.float64))
    assert weights.tolist() == pytest.approx([math.exp(-4.9), math.exp(-11.75)])
    # the loss is the mean of weight * the pair's DPO term
    out = dpo.sigmoid_loss(_batch(weights=weights), beta=0.1)
    _check(out, _mean([math.exp(-4.9) * -_logsig(0.15), math.exp(-11.75) * -_logsig(0.075)]))


def test_length_desensitised_down_weights_the_verbose_tail() -> None:
    # full = public + tail: -10 = -6 + -4; ld_alpha = 0.5 -> -6 + 0.5 * -4 = -8; ld_alpha = 1: unchanged
    full, public = torch.tensor([-10.0, -3.0]), torch.tensor([-6.0, -3.0])
    assert dpo.length_desensitised(full, public, 0.5).tolist() == [-8.0, -3.0]
    assert dpo.length_desensitised(full, public, 1.0).tolist() == [-10.0, -3.0]
    with pytest.raises(ValueError, match="ld_alpha"):
        dpo.length_desensitised(full, public, 1.5)


def test_sft_term_is_the_chosen_nll() -> None:
    # mean(chosen_nll) = mean(0.5, 1.5) = 1; it reads no reference, so a reference-free batch works
    out = dpo.sft_loss(_batch(ref_chosen=None, ref_rejected=None))
    _check(out, 1.0)
    # as a mixture part beside DPO: log-sigmoid term + 0.5 * 1
    mixed = dpo.mixture_loss(_batch(), losses=[dpo.sigmoid_loss, dpo.sft_loss], weights=[1.0, 0.5])
    _check(mixed, _mean([-_logsig(0.15), -_logsig(0.075)]) + 0.5)
    assert mixed.metrics["sft_loss/nll_loss"].item() == pytest.approx(1.0)


# -------------------------------------------------------------- reference-free losses (issue 14)


def _no_ref() -> PreferenceLogps:
    return _batch(ref_chosen=None, ref_rejected=None)


def _log_odds(m: float) -> float:
    return m - math.log(1 - math.exp(m))


def test_orpo_by_hand() -> None:
    # m = per-token mean log-prob: m_c = [-2.5, -4], m_r = [-2.4, -7.75]
    # log odds(m) = m - log(1 - e^m); ratio = log odds(m_c) - log odds(m_r)
    # loss = mean(nll - beta * log sigma(ratio)), nll = [0.5, 1.5], beta = 0.1
    ratios = [_log_odds(-2.5) - _log_odds(-2.4), _log_odds(-4.0) - _log_odds(-7.75)]
    out = dpo.orpo_loss(_no_ref(), beta=0.1)
    _check(out, _mean([0.5 - 0.1 * _logsig(ratios[0]), 1.5 - 0.1 * _logsig(ratios[1])]))
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(_mean(ratios))
    assert out.metrics["nll_loss"].item() == pytest.approx(1.0)
    # rewards: beta * m; pair 1 ranks wrong (-2.5 < -2.4), pair 2 right
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.1 * _mean([-2.5, -4.0]))
    assert out.metrics["rewards/accuracies"].item() == 0.5


def test_simpo_by_hand() -> None:
    # beta = 2: rewards r = 2 m: r_c = [-5, -8], r_r = [-4.8, -15.5]; gamma = 0.5
    # r_c - r_r - gamma = [-0.2 - 0.5, 7.5 - 0.5] = [-0.7, 7.0]
    out = dpo.simpo_loss(_no_ref(), beta=2.0, gamma=0.5)
    _check(out, _mean([-_logsig(-0.7), -_logsig(7.0)]))
    assert out.metrics["rewards/margins"].item() == pytest.approx(_mean([-0.2, 7.5]))
    assert out.metrics["rewards/accuracies"].item() == 0.5
    # gamma = 0: no target margin
    _check(dpo.simpo_loss(_no_ref(), beta=2.0, gamma=0.0), _mean([-_logsig(-0.2), -_logsig(7.5)]))


def test_cpo_by_hand() -> None:
    # u = policy_chosen - policy_rejected = [2, -0.25]; nll = [0.5, 1.5]
    # sigmoid, beta = 0.1, alpha = 1: -log sigma(0.2) + 0.5, -log sigma(-0.025) + 1.5
    out = dpo.cpo_loss(_no_ref(), beta=0.1)
    _check(out, _mean([-_logsig(0.2) + 0.5, -_logsig(-0.025) + 1.5]))
    # rewards are beta * sequence log-probs: chosen 0.1 * mean(-10, -8) = -0.9
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-0.9)
    # hinge, beta = 1, alpha = 0.5: relu(1 - 2) = 0, relu(1 + 0.25) = 1.25; + 0.5 * [0.5, 1.5]
    _check(dpo.cpo_loss(_no_ref(), beta=1.0, alpha=0.5, loss_type="hinge"), _mean([0.25, 1.25 + 0.75]))
    # ipo, beta = 0.5: (u - 1)^2 = [1, 1.5625]; alpha = 0
    _check(dpo.cpo_loss(_no_ref(), beta=0.5, alpha=0.0, loss_type="ipo"), _mean([1.0, 1.5625]))
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, hinge, ipo"):
        dpo.cpo_loss(_no_ref(), loss_type="exo")


def test_reference_losses_need_a_reference() -> None:
    with pytest.raises(ValueError, match="no ref_chosen / ref_rejected"):
        dpo.sigmoid_loss(_no_ref())


def test_needs_reference_reads_the_config() -> None:
    assert dpo.needs_reference({"_target_": "align_runner.algos.dpo.sigmoid_loss"})
    for free in ("orpo_loss", "simpo_loss", "cpo_loss", "sft_loss"):
        assert not dpo.needs_reference({"_target_": f"align_runner.algos.dpo.{free}", "_partial_": True})
    sft = {"_target_": "align_runner.algos.dpo.sft_loss"}
    mixture = {"_target_": "align_runner.algos.dpo.mixture_loss", "losses": [sft]}
    assert not dpo.needs_reference(mixture)
    assert dpo.needs_reference({**mixture, "losses": [sft, {"_target_": "align_runner.algos.dpo.ipo_loss"}]})
    assert not dpo.needs_reference(functools.partial(dpo.simpo_loss, gamma=1.0))


@pytest.mark.parametrize("name", ["orpo", "simpo", "cpo"])
def test_reference_free_gradients_prefer_chosen(name: str) -> None:
    fn = {"orpo": dpo.orpo_loss, "simpo": dpo.simpo_loss, "cpo": dpo.cpo_loss}[name]
    logps = _batch(requires_grad=True, ref_chosen=None, ref_rejected=None)
    # chosen_nll is an input here (the stage derives it from policy_chosen); the preference term alone
    # must push chosen up and rejected down
    grad_c, grad_r = torch.autograd.grad(fn(logps).loss, (logps.policy_chosen, logps.policy_rejected))
    assert (grad_c < 0).all() and (grad_r > 0).all()
