"""SFT loss: hand-computed cross-entropy, ignore index, and the grad-accumulation invariant."""

from __future__ import annotations

import math

import pytest
import torch

from align_runner.algos.sft import sft_loss


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    # B=1, T=3, V=2. labels[:, 0] is the prompt (-100); position 0 predicts label 0,
    # position 1 predicts label 1; position 2's logits predict nothing.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 1.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    return logits, labels


def test_sft_loss_by_hand() -> None:
    logits, labels = _example()
    out = sft_loss(logits, labels)
    # position 0: p(0) = 1 / (1 + 3) -> nll = log 4 = 1.38629 (argmax is 1: wrong)
    # position 1: p(1) = e / (1 + e) -> nll = log(1 + e^-1) = 0.31326 (argmax is 1: right)
    # mean over 2 counted tokens = (1.38629 + 0.31326) / 2 = 0.84978
    nll0, nll1 = math.log(4.0), math.log(1 + math.exp(-1.0))
    assert out.loss.item() == pytest.approx((nll0 + nll1) / 2, abs=1e-6)
    assert out.metrics["mean_token_accuracy"].item() == pytest.approx(0.5)
    assert out.metrics["num_tokens"].item() == 2
    # with a global count of 5 the same sum is divided by 5
    assert sft_loss(logits, labels, num_items=5).loss.item() == pytest.approx((nll0 + nll1) / 5, abs=1e-6)
    assert sft_loss(logits, labels, num_items=torch.tensor(5)).loss.item() == pytest.approx(
        (nll0 + nll1) / 5, abs=1e-6
    )


def test_ignored_labels_do_not_count() -> None:
    logits, _ = _example()
    out = sft_loss(logits, torch.tensor([[-100, -100, 1]]))
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)
    assert out.metrics["num_tokens"].item() == 1
    assert out.metrics["mean_token_accuracy"].item() == 1.0


def test_all_ignored_gives_zero_not_nan() -> None:
    logits, _ = _example()
    logits.requires_grad_(True)
    out = sft_loss(logits, torch.full((1, 3), -100))
    assert out.loss.item() == 0.0
    out.loss.backward()  # still differentiable, with zero gradient
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="labels"):
        sft_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def _ragged_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """B=8 sequences of T=10 whose counted lengths differ (1..8 target tokens).

    Row i's logits are scaled by (i + 1), so long rows have a much higher mean token loss than short
    ones: how the tokens are weighted then visibly changes the result.
    """
    torch.manual_seed(0)
    logits = torch.randn(8, 10, 13) * torch.arange(1, 9, dtype=torch.float32).view(8, 1, 1)
    labels = torch.randint(0, 13, (8, 10))
    for i in range(8):
        labels[i, : 10 - (i + 1)] = -100  # row i keeps its last i+1 labels; label 0 is never a target
    return logits, labels


def test_micro_batches_with_global_count_equal_one_batch() -> None:
    logits, labels = _ragged_batch()
    full_logits = logits.clone().requires_grad_(True)
    full = sft_loss(full_logits, labels)
    full.loss.backward()

    global_count = int((labels[:, 1:] != -100).sum())  # 1 + 2 + ... + 8 = 36
    assert global_count == 36
    micro_logits = logits.clone().requires_grad_(True)
    total = torch.zeros(())
    for i in range(8):  # 8 micro-batches of size 1, as under gradient accumulation
        part = sft_loss(micro_logits[i : i + 1], labels[i : i + 1], num_items=global_count)
        part.loss.backward()
        total = total + part.loss.detach()

    assert abs(total.item() - full.loss.item()) < 1e-6
    assert full_logits.grad is not None and micro_logits.grad is not None
    assert (full_logits.grad - micro_logits.grad).abs().max().item() < 1e-6


def test_per_micro_batch_mean_is_not_equal_for_ragged_lengths() -> None:
    logits, labels = _ragged_batch()
    full = sft_loss(logits, labels).loss
    # What naive accumulation does: each micro-batch's own token mean, averaged over the 8 steps.
    naive = sum(sft_loss(logits[i : i + 1], labels[i : i + 1]).loss for i in range(8)) / 8
    # The naive mean gives the 1-token row as much weight as the 8-token row.
    assert abs(naive.item() - full.item()) > 0.1


def test_counted_logps_in_chunks_equal_the_full_logits_loss() -> None:
    """sft_loss on TargetLogps (head + log-softmax on counted positions only, in chunks of 3) equals
    sft_loss on the full (B, T, V) logits: values, token accuracy and gradients."""
    from align_runner.algos.logprobs import TargetLogps, linear_token_logps, next_token_targets

    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 5)
    weight = torch.randn(11, 5)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100
    labels[1, 4:] = -100
    w_full = weight.clone().requires_grad_(True)
    full = sft_loss(hidden @ w_full.T, labels)
    full.loss.backward()

    w_counted = weight.clone().requires_grad_(True)
    positions, targets = next_token_targets(labels.clamp(min=0), labels != -100)
    # row 0 targets columns 3..5 (logits at 2..4); row 1 columns 1..3 (label 0 never counts)
    assert positions.nonzero().tolist() == [[0, 2], [0, 3], [0, 4], [1, 0], [1, 1], [1, 2]]
    logps, correct = linear_token_logps(hidden[positions], w_counted, targets, chunk_size=4)
    counted = sft_loss(TargetLogps(logps, correct, torch.zeros_like(targets)), None)
    counted.loss.backward()
    assert counted.loss.item() == pytest.approx(full.loss.item(), abs=1e-6)
    assert float(counted.metrics["mean_token_accuracy"]) == float(full.metrics["mean_token_accuracy"])
    assert int(counted.metrics["num_tokens"]) == 6
    assert (w_counted.grad - w_full.grad).abs().max().item() < 1e-6


def test_linear_token_logps_by_hand() -> None:
    from align_runner.algos.logprobs import linear_token_logps

    # hidden [1, 0] with weight rows [0,0], [ln 3, 0]: logits (0, ln 3) -> p = (1/4, 3/4)
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    weight = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    logps, correct = linear_token_logps(hidden, weight, torch.tensor([0, 1]), chunk_size=1)
    assert logps.tolist() == pytest.approx([math.log(0.25), math.log(0.75)])
    assert correct.tolist() == [False, True]


@pytest.mark.parametrize("chunk_size", [3, 64])  # three chunks (logits recomputed in backward) / one (kept)
def test_linear_token_logps_values_and_gradients_equal_the_plain_log_softmax(chunk_size) -> None:
    from align_runner.algos.logprobs import linear_token_logps

    torch.manual_seed(0)
    hidden = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (8,))
    targets[0] = (hidden[0] @ weight.T + bias).argmax()  # at least one right guess
    scale = torch.randn(8, dtype=torch.float64)  # a loss weighing each token differently

    logps, correct = linear_token_logps(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    ours = torch.autograd.grad((logps * scale).sum(), (hidden, weight, bias), retain_graph=True)
    again = torch.autograd.grad((logps * scale).sum(), (hidden, weight, bias))  # a retained graph reruns

    logits = hidden @ weight.T + bias
    plain = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    expected = torch.autograd.grad((plain * scale).sum(), (hidden, weight, bias))
    assert torch.allclose(logps, plain, atol=1e-12)
    assert correct.tolist() == (logits.argmax(-1) == targets).tolist() and correct[0]
    for got, rerun, want in zip(ours, again, expected):
        assert torch.allclose(got, want, atol=1e-12) and torch.equal(got, rerun)


def test_linear_token_logps_under_bf16_autocast_matches_autocast_matmuls() -> None:
    from align_runner.algos.logprobs import linear_token_logps

    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    targets = torch.randint(0, 16, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = linear_token_logps(hidden, weight, targets, chunk_size=2)
        plain = (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert logps.dtype == torch.float32 and torch.allclose(logps, plain, atol=1e-5)
    ours = torch.autograd.grad(logps.sum(), (hidden, weight))
    expected = torch.autograd.grad(plain.sum(), (hidden, weight))
    for got, want in zip(ours, expected):
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=2e-2, rtol=2e-2)


def test_linear_token_logps_of_no_tokens() -> None:
    from align_runner.algos.logprobs import linear_token_logps

    weight = torch.randn(11, 5, requires_grad=True)
    logps, correct = linear_token_logps(torch.zeros(0, 5), weight, torch.zeros(0, dtype=torch.long), chunk_size=4)
    assert logps.shape == (0,) and correct.shape == (0,)
    logps.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
