"""Bradley-Terry reward loss: values by hand with margin and centering, metrics, gradient sign, errors."""

from __future__ import annotations

import math

import pytest
import torch

from align_runner.algos.reward import bradley_terry_loss


def _softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_plain_bradley_terry_by_hand() -> None:
    out = bradley_terry_loss(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0]))
    # r_c - r_r = [1, -0.5]: -log sigma(1) = log(1 + e^-1) = 0.31326, -log sigma(-0.5) = log(1 + e^0.5) = 0.97408
    expected = (_softplus(-1.0) + _softplus(0.5)) / 2  # = 0.64367
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_with_margin_and_centering_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])
    out = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]), center_coef=0.01)
    # logits = r_c - r_r - margin = [1 - 0.5, -0.5 - 0] = [0.5, -0.5]
    # BT: (log(1 + e^-0.5) + log(1 + e^0.5)) / 2 = (0.47408 + 0.97408) / 2 = 0.72408
    # centering: 0.01 * mean((2 + 1)^2, (0.5 + 1)^2) = 0.01 * (9 + 2.25) / 2 = 0.05625
    expected = (_softplus(-0.5) + _softplus(0.5)) / 2 + 0.01 * (9.0 + 2.25) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    # metrics ignore the supplied margin and the centering term
    m = out.metrics
    assert m["accuracy"].item() == pytest.approx(0.5)  # 2 > 1 yes, 0.5 > 1 no
    assert m["margin"].item() == pytest.approx(0.25)  # mean(1, -0.5)
    assert m["rewards/chosen_mean"].item() == pytest.approx(1.25)
    assert m["rewards/rejected_mean"].item() == pytest.approx(1.0)
    # population std of [2, 0.5, 1, 1]: mean 1.125, squared deviations sum 1.1875, / 4 = 0.296875
    assert m["rewards/std"].item() == pytest.approx(math.sqrt(0.296875), abs=1e-6)
    assert all(not v.requires_grad for v in m.values())


def test_scalar_margin_broadcasts() -> None:
    out = bradley_terry_loss(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0]), margin=torch.tensor(0.5))
    # logits = [0.5, -1.0]
    assert out.loss.item() == pytest.approx((_softplus(-0.5) + _softplus(1.0)) / 2, abs=1e-6)


def test_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen = torch.tensor([2.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).loss.backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_centering_pulls_rewards_towards_zero() -> None:
    # Rewards shifted by +10 have the same BT term; only centering sees the shift, and its gradient
    # pushes both rewards down.
    chosen = torch.tensor([12.0, 10.5], requires_grad=True)
    rejected = torch.tensor([11.0, 11.0], requires_grad=True)
    shifted = bradley_terry_loss(chosen, rejected, center_coef=0.01)
    plain = bradley_terry_loss(chosen.detach() - 10, rejected.detach() - 10, center_coef=0.01)
    assert shifted.loss.item() > plain.loss.item()
    # with a strong coefficient the centering gradient 2 * coef * (r_c + r_r) > 0 dominates BT's
    grad_c, grad_r = torch.autograd.grad(
        bradley_terry_loss(chosen, rejected, center_coef=1.0).loss, (chosen, rejected)
    )
    assert (grad_c > 0).all() and (grad_r > 0).all()


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), center_coef=-1.0)
