"""KTO's losses against values worked out by hand, its KL reference point, and its data: the unpaired
view (pairs unpaired, labels kept) and the mismatched KL completions.

Shared batch of 4 rows (binary-exact numbers):
    policy = [-5, -6, -7, -8],  ref = [-6, -6, -6, -6]        -> r = [1, 0, -1, -2]
    desirable = [1, 1, 0, 0]
    policy_kl = [-9, -9, -9, -9], ref_kl = [-10, -9.5, -9, -8.5] -> KL samples [1, 0.5, 0, -0.5]
    z0 = max(0, mean(1, 0.5, 0, -0.5)) = 0.25
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest_data import EOS, ids, word_tokenizer

from align_runner.algos import kto
from align_runner.algos.kto import UnpairedLogps
from align_runner.data.errors import DataError
from align_runner.data.prepare import prepare_rows
from align_runner.data.unpaired import kl_partner, with_kl_completions


def _batch(requires_grad: bool = False, **overrides: torch.Tensor) -> UnpairedLogps:
    def t(values: list[float], grad: bool = False) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, requires_grad=grad)

    fields = {
        "policy": t([-5.0, -6.0, -7.0, -8.0], requires_grad),
        "ref": t([-6.0, -6.0, -6.0, -6.0]),
        "policy_kl": t([-9.0, -9.0, -9.0, -9.0], requires_grad),
        "ref_kl": t([-10.0, -9.5, -9.0, -8.5]),
        "desirable": t([1.0, 1.0, 0.0, 0.0]),
    }
    fields.update(overrides)
    return UnpairedLogps(**fields)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_kl_reference_point_is_the_clamped_mean_of_the_mismatched_log_ratios() -> None:
    assert kto.kl_reference_point(_batch()).item() == pytest.approx(0.25)
    # KL samples [-1, -1.5, -2, -2.5]: a negative estimate of a KL is clamped to 0
    negative = _batch(ref_kl=torch.tensor([-8.0, -7.5, -7.0, -6.5], dtype=torch.float64))
    assert kto.kl_reference_point(negative).item() == 0.0


def test_kto_by_hand() -> None:
    # beta = 1, z0 = 0.25; desirable: w_d (1 - sigma(r - z0)), undesirable: w_u (1 - sigma(z0 - r))
    # r = [1, 0, -1, -2]: desirable rows 1 - sigma(0.75), 1 - sigma(-0.25);
    # undesirable rows 1 - sigma(1.25), 1 - sigma(2.25); w_d = 2, w_u = 1
    expected = _mean([2 * (1 - _sig(0.75)), 2 * (1 - _sig(-0.25)), 1 - _sig(1.25), 1 - _sig(2.25)])
    out = kto.kto_loss(_batch(), beta=1.0, desirable_weight=2.0, undesirable_weight=1.0)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    m = out.metrics
    # rewards beta*r: desirable mean(1, 0) = 0.5, undesirable mean(-1, -2) = -1.5
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-1.5)
    # on the right side of z0 = 0.25: 1 > z0 yes, 0 > z0 no; -1 < z0 yes, -2 < z0 yes -> 3/4
    assert m["rewards/accuracies"].item() == pytest.approx(0.75)
    assert m["kl"].item() == pytest.approx(0.25)
    assert m["logps/chosen"].item() == pytest.approx(-5.5) and m["logps/rejected"].item() == pytest.approx(-7.5)


def test_kto_beta_scales_the_distance_to_the_reference_point() -> None:
    # beta = 0.1: the arguments are 0.1 * [0.75, -0.25] (desirable) and 0.1 * [1.25, 2.25] (undesirable)
    expected = _mean([1 - _sig(0.075), 1 - _sig(-0.025), 1 - _sig(0.125), 1 - _sig(0.225)])
    assert kto.kto_loss(_batch(), beta=0.1).loss.item() == pytest.approx(expected, abs=1e-12)


def test_kto_reference_point_is_detached() -> None:
    # z0 sets the reference point and is not optimised: no gradient reaches the KL samples, and the
    # gradient of a desirable row is exactly -beta * s (1 - s) / B, s = sigma(beta (r - z0))
    logps = _batch(requires_grad=True)
    grad_policy, grad_kl = torch.autograd.grad(
        kto.kto_loss(logps, beta=1.0).loss, (logps.policy, logps.policy_kl), allow_unused=True
    )
    assert grad_kl is None
    s = _sig(0.75)
    assert grad_policy[0].item() == pytest.approx(-s * (1 - s) / 4)
    # desirable rows are pushed up, undesirable ones down
    assert (grad_policy[:2] < 0).all() and (grad_policy[2:] > 0).all()


def test_apo_zero_unpaired_by_hand() -> None:
    # anchored at 0: desirable w_d (1 - sigma(r)), undesirable w_u sigma(r); beta = 1, w_u = 3
    expected = _mean([1 - _sig(1.0), 1 - _sig(0.0), 3 * _sig(-1.0), 3 * _sig(-2.0)])
    out = kto.apo_zero_unpaired_loss(_batch(), beta=1.0, undesirable_weight=3.0)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    # accuracy against the anchor 0: 1 > 0 yes, 0 > 0 no (a tie), -1 < 0, -2 < 0 -> 3/4; kl still reported
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(0.75)
    assert out.metrics["kl"].item() == pytest.approx(0.25)


@pytest.mark.parametrize("loss", [kto.kto_loss, kto.apo_zero_unpaired_loss])
def test_bad_numbers_and_shapes_raise(loss) -> None:
    with pytest.raises(ValueError, match="beta must be > 0"):
        loss(_batch(), beta=0.0)
    with pytest.raises(ValueError, match="undesirable_weight must be >= 0"):
        loss(_batch(), undesirable_weight=-1.0)
    with pytest.raises(ValueError, match=r"UnpairedLogps.ref_kl has shape \(3,\), expected \(4,\)"):
        loss(_batch(ref_kl=torch.zeros(3, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------- data


def test_kl_partner_is_the_next_row_with_another_prompt() -> None:
    # a pair unpaired gives two neighbours with one prompt: rows 0 and 1 share [1], rows 2 and 3 [2]
    rows = [{"prompt_ids": [1]}, {"prompt_ids": [1]}, {"prompt_ids": [2]}, {"prompt_ids": [2]}, {"prompt_ids": [3]}]
    assert [kl_partner(rows, i) for i in range(5)] == [2, 2, 4, 4, 0]
    with pytest.raises(ValueError, match="all 2 unpaired rows have the same prompt"):
        kl_partner([{"prompt_ids": [1]}, {"prompt_ids": [1]}], 0)


def test_with_kl_completions_lays_rows_out_as_pairs() -> None:
    rows = [
        {"prompt_ids": [1, 2], "completion_ids": [7, 8, 9], "desirable": 1.0},
        {"prompt_ids": [3], "completion_ids": [5], "desirable": 0.0},
    ]
    out = with_kl_completions(rows, max_length=4)
    # row 0: its own completion, and row 1's as the KL sample; row 1: row 0's cut to 4 - 1 = 3 tokens
    assert out[0] == {"prompt_ids": [1, 2], "chosen_ids": [7, 8, 9], "rejected_ids": [5], "desirable": 1.0}
    assert out[1] == {"prompt_ids": [3], "chosen_ids": [5], "rejected_ids": [7, 8, 9], "desirable": 0.0}
    assert with_kl_completions(rows, max_length=3)[1]["rejected_ids"] == [7, 8]


@pytest.fixture(scope="module")
def wt():
    return word_tokenizer()


def test_unpaired_view_unpairs_pairs_and_keeps_labels(wt):
    pair = {"prompt": "a b", "chosen": " hello friend", "rejected": " bad"}
    examples, stats = prepare_rows([pair], "s", "unpaired", wt, max_length=8)
    assert examples == [
        {"prompt_ids": ids(wt, "a", "b"), "completion_ids": ids(wt, "hello", "friend", EOS), "desirable": 1.0},
        {"prompt_ids": ids(wt, "a", "b"), "completion_ids": ids(wt, "bad", EOS), "desirable": 0.0},
    ]
    # counts are of source rows: one pair kept
    assert (stats.total, stats.kept) == (1, 1)
    rows = [{"prompt": "a b", "completion": " yes", "label": True}, {"prompt": "c", "completion": " no", "label": 0}]
    examples, stats = prepare_rows(rows, "s", "unpaired", wt, max_length=8)
    assert examples == [
        {"prompt_ids": ids(wt, "a", "b"), "completion_ids": ids(wt, "yes", EOS), "desirable": 1.0},
        {"prompt_ids": ids(wt, "c"), "completion_ids": ids(wt, "no", EOS), "desirable": 0.0},
    ]
    # the preference length policy: prompt 2 + completion cut to max_length 3 - 2 = 1 token
    examples, stats = prepare_rows(rows[:1], "s", "unpaired", wt, max_length=3)
    assert examples[0]["completion_ids"] == ids(wt, "yes") and stats.truncated_by == {"too_long": 1}


def test_unpaired_view_errors_name_the_row_and_column(wt):
    rows = [{"prompt": "a", "completion": " yes", "label": True}, {"prompt": "b", "completion": " no", "label": "no"}]
    with pytest.raises(DataError, match=r"s: row 1: column 'label'.*a bool \(true = desirable completion\)"):
        prepare_rows(rows, "s", "unpaired", wt, max_length=8)
    with pytest.raises(DataError, match="cannot feed the 'unpaired' view; it accepts: unpaired_preference, preference"):
        prepare_rows([{"prompt": "a", "completion": " b"}], "s", "unpaired", wt, max_length=8)
