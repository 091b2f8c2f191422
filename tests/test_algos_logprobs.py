"""Log-prob helpers: hand-computed values on tiny vocabularies, masking, precision handling."""

from __future__ import annotations

import math

import pytest
import torch

from align_runner.algos.logprobs import masked_mean, masked_sum, sequence_logps, shifted_token_logps


def _logits_1x3() -> torch.Tensor:
    # One sequence, T=3 positions, vocabulary of 3.
    # position 0 predicts token 1, position 1 predicts token 2; position 2's logits are never used.
    return torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, -5.0, 0.0]]])


def test_shifted_token_logps_by_hand() -> None:
    ids = torch.tensor([[0, 2, 1]])
    out = shifted_token_logps(_logits_1x3(), ids)
    # token 2 after position 0: 2 - log(e^0 + e^1 + e^2) = 2 - log(11.1073) = -0.40761
    # token 1 after position 1: uniform logits -> log(1/3) = -1.09861
    expected = [2.0 - math.log(1 + math.e + math.e**2), math.log(1 / 3)]
    assert out.shape == (1, 2)
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_sequence_logps_by_hand_with_mask() -> None:
    ids = torch.tensor([[0, 2, 1]])
    t1 = 2.0 - math.log(1 + math.e + math.e**2)
    t2 = math.log(1 / 3)
    # mask aligned with ids: tokens 1 and 2 count -> t1 + t2 = -0.40761 - 1.09861 = -1.50622, 2 tokens
    logps, counts = sequence_logps(_logits_1x3(), ids, torch.tensor([[0, 1, 1]]))
    assert logps.item() == pytest.approx(t1 + t2, abs=1e-6)
    assert counts.tolist() == [2]
    assert counts.dtype == torch.long
    # only token 2 counts -> -1.09861, 1 token; loss_mask[:, 0] is ignored whatever its value
    logps, counts = sequence_logps(_logits_1x3(), ids, torch.tensor([[1, 0, 1]]))
    assert logps.item() == pytest.approx(t2, abs=1e-6)
    assert counts.tolist() == [1]


def test_sequence_logps_tolerates_invalid_ids_outside_the_mask() -> None:
    # Padding written as -100 at a masked-out position must not break the gather.
    ids = torch.tensor([[0, 2, -100]])
    logps, counts = sequence_logps(_logits_1x3(), ids, torch.tensor([[0, 1, 0]]))
    assert logps.item() == pytest.approx(2.0 - math.log(1 + math.e + math.e**2), abs=1e-6)
    assert counts.tolist() == [1]


def test_shifted_token_logps_matches_log_softmax_and_has_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    ids = torch.randint(0, 7, (3, 5))
    out = shifted_token_logps(logits, ids)
    reference = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert logits.grad is not None and logits.grad[:, -1].abs().sum() == 0  # last logit unused


def test_bf16_logits_are_upcast_to_float32() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11) * 4
    ids = torch.randint(0, 11, (2, 6))
    out = shifted_token_logps(logits.bfloat16(), ids)
    assert out.dtype == torch.float32
    # Same answer as float32 on the bf16-rounded logits: only the input was rounded, not the math.
    torch.testing.assert_close(out, shifted_token_logps(logits.bfloat16().float(), ids))


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="logits"):
        shifted_token_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        shifted_token_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 2))


def test_masked_sum_and_mean() -> None:
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # inf/nan sit only at masked-out positions and must not leak.
    assert masked_sum(x, mask).item() == 1 + 2 + 4 + 6
    assert masked_mean(x, mask).item() == pytest.approx(13 / 4)
    assert masked_sum(x, mask, dim=1).tolist() == [3.0, 10.0]
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 5.0]
    assert masked_mean(x, mask.bool(), dim=0).tolist() == [2.5, 2.0, 6.0]


def test_masked_mean_of_empty_mask_is_zero() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[0, 0], [1, 0]])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_mean(x, mask, dim=1).tolist() == [0.0, 3.0]
