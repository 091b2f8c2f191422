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
