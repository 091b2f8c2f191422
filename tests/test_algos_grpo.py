"""Online-RL pieces (advantages, KL estimators, ratios, clipped surrogate, aggregations, grpo_loss),
each against values worked out by hand in the comments.

Shared rewards: [1, 0, 0, 1 | 1, 1, 1, 0] with group_size G = 4 (two prompts).
    group 1: mean 0.5,  centred [ 0.5, -0.5, -0.5,  0.5], sum sq 1.00, unbiased var 1/3, std sqrt(1/3)
    group 2: mean 0.75, centred [0.25, 0.25, 0.25, -0.75], sum sq 0.75, unbiased var 1/4, std 0.5
    all 8: mean 5/8; five 1s deviate by 3/8, three 0s by -5/8:
        sum sq = 5 * 9/64 + 3 * 25/64 = 120/64 = 1.875, unbiased var 1.875 / 7 = 15/56
"""

from __future__ import annotations

import math

import pytest
import torch

from align_runner.algos import advantages as adv
from align_runner.algos import kl, policy, reduce
from align_runner.algos.grpo import PolicyBatch, grpo_loss

REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
CENTRED = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
EPS = 1e-4


def t(values, **kwargs) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, **kwargs)


def close(actual: torch.Tensor, expected, abs: float = 1e-9) -> None:
    assert actual.detach().double().flatten().tolist() == pytest.approx(
        torch.as_tensor(expected, dtype=torch.float64).flatten().tolist(), abs=abs
    )


# ------------------------------------------------------------------------------------- advantages


def test_group_advantages_group_scale():
    # group 1: +-0.5 / (sqrt(1/3) + eps); group 2: [0.25, 0.25, 0.25, -0.75] / (0.5 + eps)
    s1, s2 = math.sqrt(1 / 3) + EPS, 0.5 + EPS
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0.25 / s2, 0.25 / s2, 0.25 / s2, -0.75 / s2]
    close(adv.group_advantages(t(REWARDS), 4), expected)
    close(adv.group_advantages(t(REWARDS), 4, scale_rewards="group"), expected)


def test_group_advantages_batch_scale():
    # one std for all 8 rewards: sqrt(15/56)
    s = math.sqrt(15 / 56) + EPS
    close(adv.group_advantages(t(REWARDS), 4, scale_rewards="batch"), [c / s for c in CENTRED])


def test_group_advantages_no_scale_is_dr_grpo():
    close(adv.group_advantages(t(REWARDS), 4, scale_rewards="none"), CENTRED)


def test_group_advantages_zero_variance_group_is_zero_and_int_rewards_work():
    # [2, 2] has std 0 -> (0) / (0 + eps) = 0; [0, 1] (ints) -> +-0.5 / (sqrt(1/2) + eps)
    s = math.sqrt(0.5) + EPS
    out = adv.group_advantages(torch.tensor([2, 2, 0, 1]), 2)
    assert out.is_floating_point()
    close(out, [0.0, 0.0, -0.5 / s, 0.5 / s], abs=1e-6)


def test_rloo_advantages():
    # A_i = r_i - (S - r_i) / 3. Group 1, S = 2: r=1 -> 1 - 1/3 = 2/3, r=0 -> -2/3.
    # Group 2, S = 3: r=1 -> 1 - 2/3 = 1/3, r=0 -> 0 - 3/3 = -1.
    close(adv.rloo_advantages(t(REWARDS), 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0])


def test_reinforce_pp_advantages():
    # centred values sum to 0 (batch mean 0); sum sq = 4 * 0.25 + 3 * 0.0625 + 0.5625 = 1.75,
    # unbiased var 1.75 / 7 = 0.25, std 0.5 -> A = centred / (0.5 + eps)
    close(adv.reinforce_pp_advantages(t(REWARDS), 4), [c / (0.5 + EPS) for c in CENTRED])


def test_zero_std_groups():
    # groups [1, 1], [0, 1], [2, 2]
    out = adv.zero_std_groups(t([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2)
    assert out.dtype == torch.bool
    assert out.tolist() == [True, True, False, False, True, True]
    assert adv.zero_std_groups(t(REWARDS), 4).tolist() == [False] * 8


@pytest.mark.parametrize(
    "fn", [adv.group_advantages, adv.rloo_advantages, adv.reinforce_pp_advantages, adv.zero_std_groups]
)
def test_advantages_reject_bad_layouts(fn):
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        fn(t([1.0] * 7), 4)
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        fn(t([[1.0, 0.0]]), 2)


def test_advantages_reject_groups_of_one_and_bad_scale():
    for fn in (adv.group_advantages, adv.rloo_advantages, adv.reinforce_pp_advantages):
        with pytest.raises(ValueError, match="group_size"):
            fn(t([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="'sequence'"):
        adv.group_advantages(t(REWARDS), 4, scale_rewards="sequence")


# --------------------------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    # logps - ref = [0.5, -1.0, 0.0]; log r = ref - logps = [-0.5, 1.0, 0.0]
    logps, ref = t([-1.0, -2.0, -3.0]), t([-1.5, -1.0, -3.0])
    close(kl.kl_k1(logps, ref), [0.5, -1.0, 0.0])
    close(kl.kl_k2(logps, ref), [0.125, 0.5, 0.0])
    # k3 = e^{log r} - log r - 1: e^-0.5 + 0.5 - 1 = 0.1065306597, e - 1 - 1 = 0.7182818285, 0
    k3 = kl.kl_k3(logps, ref)
    close(k3, [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])
    close(k3, [0.1065306597, 0.7182818285, 0.0], abs=1e-9)
    assert (k3 >= 0).all()
    for name, fn in kl.KL_ESTIMATORS.items():
        close(kl.kl_estimate(logps, ref, name), fn(logps, ref))


def test_kl_estimate_rejects_unknown_name():
    with pytest.raises(ValueError, match="k1, k2, k3") as info:
        kl.kl_estimate(t([0.0]), t([0.0]), "k4")
    assert "'k4'" in str(info.value)


# ------------------------------------------------------------------------------------ ratios, clip


def test_token_ratio_and_padding():
    # exp(-1 - (-1.5)) = e^0.5, exp(-2 - (-1)) = e^-1; padding has an overflowing difference -> ratio 1
    logps = t([[-1.0, -2.0, 500.0]], requires_grad=True)
    old = t([[-1.5, -1.0, -500.0]])
    ratio = policy.importance_ratio(logps, old, t([[1, 1, 0]]))
    close(ratio, [math.exp(0.5), math.exp(-1.0), 1.0])
    ratio.sum().backward()
    # d exp(l - o) / d l = exp(l - o); padding gets exactly 0, not NaN
    close(logps.grad, [math.exp(0.5), math.exp(-1.0), 0.0])


def test_sequence_ratio_value_and_gradient_gspo():
    # 1x2: log ratios [-1 - (-1.25), -2 - (-2.25)] = [0.25, 0.25], mean 0.25 -> s = e^0.25 on both.
    logps = t([[-1.0, -2.0]], requires_grad=True)
    old = t([[-1.25, -2.25]])
    ratio = policy.importance_ratio(logps, old, t([[1, 1]]), level="sequence")
    s = math.exp(0.25)
    close(ratio, [s, s])
    # s = exp((l1 - o1 + l2 - o2) / 2): d s / d l_t = s / 2 for each token, for every copy of s.
    (grad,) = torch.autograd.grad(ratio[0, 0], logps, retain_graph=True)
    close(grad, [s / 2, s / 2])
    (grad,) = torch.autograd.grad(ratio.sum(), logps)
    close(grad, [s, s])  # two copies, s/2 each


def test_sequence_ratio_ignores_masked_tokens():
    # counted log ratios [0.5, -0.1] -> mean 0.2; the masked third token neither counts nor gets grad.
    logps = t([[0.0, 0.0, 9.0]], requires_grad=True)
    ratio = policy.importance_ratio(logps, t([[-0.5, 0.1, 0.0]]), t([[1, 1, 0]]), level="sequence")
    close(ratio, [math.exp(0.2)] * 3)
    (grad,) = torch.autograd.grad(ratio[0, 0], logps)
    close(grad, [math.exp(0.2) / 2, math.exp(0.2) / 2, 0.0])


def test_importance_ratio_rejects_bad_level():
    with pytest.raises(ValueError, match="'group'"):
        policy.importance_ratio(t([[0.0]]), t([[0.0]]), t([[1]]), level="group")


RATIOS = [[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]]


def test_clipped_surrogate_both_signs():
    # eps_low = 0.2, eps_high = 0.28 -> clip range [0.8, 1.28]
    # A = +1: -min(r, clip(r)): 0.5 -> -0.5, 0.9 -> -0.9, 1.1 -> -1.1, 1.5 -> -min(1.5, 1.28) = -1.28
    # A = -1: max(r, clip(r)): 0.5 -> max(0.5, 0.8) = 0.8, 0.9, 1.1, 1.5 -> 1.5
    ratio = t(RATIOS, requires_grad=True)
    loss = policy.clipped_surrogate(ratio, t([1.0, -1.0]), epsilon_low=0.2, epsilon_high=0.28)
    close(loss, [[-0.5, -0.9, -1.1, -1.28], [0.8, 0.9, 1.1, 1.5]])
    # gradient d loss / d r = -A where unclipped, 0 where the clipped term is the min
    (grad,) = torch.autograd.grad(loss.sum(), ratio)
    close(grad, [[-1.0, -1.0, -1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])


def test_clip_higher_is_asymmetric():
    # r = 1.25, A = +1: with eps_high 0.28 it is inside [0.8, 1.28] -> -1.25; symmetric 0.2 clips to -1.2.
    # r = 0.75, A = -1: eps_low 0.2 clips at 0.8 either way -> 0.8.
    ratio, a = t([[1.25], [0.75]]), t([1.0, -1.0])
    close(policy.clipped_surrogate(ratio, a, epsilon_low=0.2, epsilon_high=0.28), [[-1.25], [0.8]])
    close(policy.clipped_surrogate(ratio, a, epsilon_low=0.2, epsilon_high=0.2), [[-1.2], [0.8]])


def test_clip_fractions():
    # low: r < 0.8 and A < 0 -> row 2's 0.5 only; high: r > 1.28 and A > 0 -> row 1's 1.5 only.
    # Row 1's 0.5 (A > 0) and row 2's 1.5 (A < 0) are outside the range but not clipped.
    ratio, a = t(RATIOS), t([1.0, -1.0])
    out = policy.clip_fractions(ratio, a, t([[1] * 4] * 2), epsilon_low=0.2, epsilon_high=0.28)
    close(out["low"], 1 / 8)
    close(out["high"], 1 / 8)
    close(out["region"], 2 / 8)
    # masking row 1's 1.5: 7 tokens count, none high
    out = policy.clip_fractions(ratio, a, t([[1, 1, 1, 0], [1] * 4]), epsilon_low=0.2, epsilon_high=0.28)
    close(out["low"], 1 / 7, abs=1e-7)
    close(out["high"], 0.0)
    close(out["region"], 1 / 7, abs=1e-7)


def test_entropy_from_logits():
    # uniform over V = 5 (any constant logit): H = log 5
    close(policy.entropy_from_logits(torch.zeros(2, 3, 5)), [[math.log(5)] * 3] * 2, abs=1e-6)
    close(policy.entropy_from_logits(t([7.0] * 5)), math.log(5))
    # logits [0, log 3] -> p = [1/4, 3/4]: H = 1/4 log 4 + 3/4 log(4/3) = 0.5623351446
    close(policy.entropy_from_logits(t([0.0, math.log(3)])), 0.5623351446, abs=1e-9)
    # stable for huge logits; a -inf logit contributes 0 (H = log 2), with finite gradients
    close(policy.entropy_from_logits(t([1000.0, 1000.0])), math.log(2))
    logits = t([0.0, 0.0, -math.inf], requires_grad=True)
    h = policy.entropy_from_logits(logits)
    close(h, math.log(2))
    h.backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_half_precision_is_float32():
    out = policy.entropy_from_logits(torch.zeros(2, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    close(out, [[math.log(8)] * 3] * 2, abs=1e-6)


# ------------------------------------------------------------------------------------ aggregations

# Two sequences of lengths 3 and 1 (T = 4); padding holds NaN, which must never leak.
NAN = float("nan")
MASK2 = [[1, 1, 1, 0], [1, 0, 0, 0]]
LOSS2 = [[1.0, 2.0, 3.0, NAN], [4.0, NAN, NAN, NAN]]
CONTEXT = {"max_completion_length": 4, "mean_completion_tokens": 2.5}


def _loss(name: str, per_token: torch.Tensor, mask: torch.Tensor, **context) -> torch.Tensor:
    weights, num_items = reduce.AGGREGATIONS[name](mask, **context)
    return reduce.aggregate(per_token, mask, weights, num_items)


def test_grpo_aggregation_by_hand():
    # mean of token means: ((1 + 2 + 3) / 3 + 4 / 1) / 2 = (2 + 4) / 2 = 3
    weights, n = reduce.grpo(torch.tensor(MASK2), **CONTEXT)
    close(weights, [[1 / 3, 1 / 3, 1 / 3, 0.0], [1.0, 0.0, 0.0, 0.0]], abs=1e-7)
    assert n == 2.0
    close(_loss("grpo", t(LOSS2), torch.tensor(MASK2)), 3.0, abs=1e-6)


def test_dr_grpo_aggregation_by_hand():
    # token sum / (2 sequences x L = 4): (1 + 2 + 3 + 4) / 8 = 1.25
    weights, n = reduce.dr_grpo(torch.tensor(MASK2), **CONTEXT)
    close(weights, [[0.25, 0.25, 0.25, 0.0], [0.25, 0.0, 0.0, 0.0]])
    assert n == 2.0
    close(_loss("dr_grpo", t(LOSS2), torch.tensor(MASK2), **CONTEXT), 1.25)


def test_dapo_aggregation_by_hand():
    # token mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    weights, n = reduce.dapo(torch.tensor(MASK2), **CONTEXT)
    close(weights, [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert n == 4.0
    close(_loss("dapo", t(LOSS2), torch.tensor(MASK2)), 2.5)


def test_bnpo_aggregation_by_hand():
    # token sum / (2 sequences x mean length 2.5): 10 / 5 = 2.0
    weights, n = reduce.bnpo(torch.tensor(MASK2), **CONTEXT)
    close(weights, [[0.4, 0.4, 0.4, 0.0], [0.4, 0.0, 0.0, 0.0]], abs=1e-7)
    assert n == 2.0
    close(_loss("bnpo", t(LOSS2), torch.tensor(MASK2), **CONTEXT), 2.0, abs=1e-6)


def test_aggregations_reject_bad_context_and_empty_batch_is_zero():
    with pytest.raises(ValueError, match="max_completion_length"):
        reduce.dr_grpo(torch.tensor(MASK2), max_completion_length=0)
    with pytest.raises(ValueError, match="mean_completion_tokens"):
        reduce.bnpo(torch.tensor(MASK2), mean_completion_tokens=-1.0)
    empty = torch.zeros(2, 3)
    weights, n = reduce.dapo(empty)
    assert n == 0.0
    assert reduce.aggregate(t([[1.0] * 3] * 2), empty, weights, n).item() == 0.0


LENGTHS = [5, 1, 3, 8, 2, 6]  # 25 tokens, T = 8
SPLITS = [[2, 4], [1, 2, 3], [6]]


@pytest.mark.parametrize("name", sorted(reduce.AGGREGATIONS))
def test_aggregation_is_split_invariant(name):
    torch.manual_seed(0)
    mask = (torch.arange(8)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    context = {"max_completion_length": 8, "mean_completion_tokens": 25 / 6}
    per_token = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)

    weights, global_items = reduce.AGGREGATIONS[name](mask, **context)
    whole = reduce.aggregate(per_token, mask, weights, global_items)
    (whole_grad,) = torch.autograd.grad(whole, per_token)

    for sizes in SPLITS:
        total = torch.zeros((), dtype=torch.float64)
        items = 0.0
        for rows, m in zip(per_token.split(sizes), mask.split(sizes)):
            w, n = reduce.AGGREGATIONS[name](m, **context)
            items += n
            # the engine's rescaling: micro loss (a mean over its n items) * n / global items
            total = total + reduce.aggregate(rows, m, w, n) * (n / global_items)
        assert items == global_items
        close(total, whole.item(), abs=1e-12)
        (grad,) = torch.autograd.grad(total, per_token)
        close(grad, whole_grad, abs=1e-12)


# -------------------------------------------------------------------------------------- grpo_loss

LOGPS = [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]  # lengths 3 and 2
ADV = [1.0, -0.5]


def _batch(aggregation: str = "grpo", **overrides) -> PolicyBatch:
    mask = t(MASK)
    weights, n = reduce.AGGREGATIONS[aggregation](mask)
    fields = {"logps": t(LOGPS, requires_grad=True), "mask": mask, "advantages": t(ADV)}
    fields.update(weights=weights, num_items=n)
    fields.update(overrides)
    return PolicyBatch(**fields)


def test_grpo_loss_on_policy_is_minus_mean_advantage():
    # ratio 1 everywhere, so per-token loss = -A_i; GRPO aggregation: -(1 + (-0.5)) / 2 = -0.25
    batch = _batch()
    out = grpo_loss(batch)
    close(out.loss, -0.25, abs=1e-7)
    close(out.metrics["policy_loss"], -0.25, abs=1e-7)
    for key in ("low", "high", "region"):
        close(out.metrics[f"clip_ratio/{key}_mean"], 0.0)
    assert "kl" not in out.metrics and "entropy" not in out.metrics
    # policy gradient: d loss / d logp_{i,t} = -A_i / (B |y_i|): row 1 -1/6, row 2 0.5/4 = 0.125
    out.loss.backward()
    close(batch.logps.grad, [[-1 / 6] * 3, [0.125, 0.125, 0.0]], abs=1e-7)


def test_grpo_loss_on_policy_dapo_token_mean():
    # 5 tokens: -(3 * 1 + 2 * (-0.5)) / 5 = -0.4
    close(grpo_loss(_batch("dapo")).loss, -0.4)


def test_grpo_loss_adds_kl_with_beta():
    # logps - ref = [[0.5, 0, 0], [0, 1, (masked)]]; with k1 the per-token KL is that difference.
    # grpo: -0.25 + 0.1 * mean(0.5 / 3, 1 / 2) = -0.25 + 0.1 * (2/3) / 2 = -0.25 + 1/30 = -0.2166667
    ref = t([[-1.5, -1.0, -1.0], [-1.0, -2.0, 800.0]])  # padding: exp(801) would overflow to inf
    out = grpo_loss(_batch(ref_logps=ref), beta=0.1, kl_estimator="k1")
    close(out.loss, -0.25 + 1 / 30, abs=1e-7)
    close(out.metrics["policy_loss"], -0.25, abs=1e-7)
    close(out.metrics["kl"], (0.5 + 1.0) / 5, abs=1e-7)  # masked token mean
    # default k3: log r = ref - logps = -0.5 and -1: (e^-0.5 + 0.5 - 1 + e^-1 + 1 - 1) / 5 = 0.0948820
    batch = _batch(ref_logps=ref)
    out = grpo_loss(batch, beta=0.1)
    k3a, k3b = math.exp(-0.5) - 0.5, math.exp(-1.0)
    close(out.metrics["kl"], (k3a + k3b) / 5, abs=1e-7)
    close(out.loss, -0.25 + 0.1 * (k3a / 3 + k3b / 2) / 2, abs=1e-7)
    out.loss.backward()
    assert torch.isfinite(batch.logps.grad).all()  # the 800 in padding poisons neither value nor grad
    # beta = 0 with a reference: KL is logged, not added
    out = grpo_loss(_batch(ref_logps=ref), beta=0.0)
    close(out.loss, -0.25, abs=1e-7)
    assert "kl" in out.metrics


def test_grpo_loss_off_policy_clipping():
    # ratio = exp(0 - (-ln 2)) = 2 on token 1 (A = +1 -> clipped at 1.2, no gradient), 1 on token 2.
    # grpo: -(1.2 + 1) / 2 = -1.1; gradient on token 2 = -r * A / |y| = -0.5
    logps = t([[0.0, 0.0]], requires_grad=True)
    mask = t([[1, 1]])
    weights, n = reduce.grpo(mask)
    batch = PolicyBatch(logps, mask, t([1.0]), weights, n, old_logps=t([[-math.log(2), 0.0]]))
    out = grpo_loss(batch)
    close(out.loss, -1.1, abs=1e-7)
    close(out.metrics["clip_ratio/high_mean"], 0.5)
    close(out.metrics["clip_ratio/low_mean"], 0.0)
    close(out.metrics["clip_ratio/region_mean"], 0.5)
    out.loss.backward()
    close(logps.grad, [[0.0, -0.5]], abs=1e-7)


def test_grpo_loss_sequence_level_matches_gspo():
    # log ratios [0.5, -0.1] -> s = e^0.2 = 1.2214 on both tokens, A = +1.
    # eps_high 0.28: unclipped, loss = -s, d loss / d logp_t = -s / |y| = -s / 2 on each token.
    # eps_high 0.2: s > 1.2 -> clipped at 1.2 and no gradient.
    mask = t([[1, 1]])
    weights, n = reduce.grpo(mask)
    old = t([[-0.5, 0.1]])
    s = math.exp(0.2)
    logps = t([[0.0, 0.0]], requires_grad=True)
    batch = PolicyBatch(logps, mask, t([1.0]), weights, n, old_logps=old)
    out = grpo_loss(batch, importance_sampling_level="sequence", epsilon_high=0.28)
    close(out.loss, -s, abs=1e-7)
    out.loss.backward()
    close(logps.grad, [[-s / 2, -s / 2]], abs=1e-7)
    out = grpo_loss(batch._replace(logps=t([[0.0, 0.0]])), importance_sampling_level="sequence")
    close(out.loss, -1.2, abs=1e-7)
    close(out.metrics["clip_ratio/high_mean"], 1.0)


def test_grpo_loss_entropy_metric_and_errors():
    # entropy masked mean: (1 + 2 + 3 + 4 + 5) / 5 = 3 (the masked 100 is ignored)
    out = grpo_loss(_batch(entropy=t([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])))
    close(out.metrics["entropy"], 3.0)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.metrics.values())
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(_batch(), beta=0.04)
    with pytest.raises(ValueError, match="'tokens'"):
        grpo_loss(_batch(), importance_sampling_level="tokens")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        grpo_loss(_batch(ref_logps=t(LOGPS)), beta=0.1, kl_estimator="kl")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(_batch(advantages=t([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="weights"):
        grpo_loss(_batch(weights=torch.ones(2, 4)))
