"""PPO's pure functions (``align_runner.algos.ppo``), each against values worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from align_runner.algos import ppo, reduce
from align_runner.algos.grpo import PolicyBatch, grpo_loss

LN2 = math.log(2)


def t(values, **kwargs) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, **kwargs)


def close(actual, expected, abs: float = 1e-9) -> None:
    actual = torch.as_tensor(actual).detach().double().flatten().tolist()
    assert actual == pytest.approx(torch.as_tensor(expected, dtype=torch.float64).flatten().tolist(), abs=abs)


# ---------------------------------------------------------------------------------- token_rewards

# Three rows: 3 counted tokens, 2 counted (then padding), none counted.
MASK3 = [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
SCORES = [2.0, -1.0, 5.0]
LOGPS = [[-1.0, -2.0, -0.5], [-1.0, -1.0, 900.0], [-1.0, -1.0, -1.0]]
# The padding's -900 against 900 would overflow k3's exp() if it were evaluated there.
REF = [[-1.5, -2.0, -1.0], [-0.5, -1.0, -900.0], [-3.0, -3.0, -3.0]]


def test_token_rewards_k1_score_at_last_token():
    # k1 = logps - ref: row 0 [0.5, 0, 0.5], row 1 [-0.5, 0, (pad) 0], row 2 nothing counted: 0.
    # rewards = -0.1 * kl, plus the score at the last counted token:
    #   row 0 [-0.05, 0, -0.05 + 2] ; row 1 [0.05, 0 - 1, 0] ; row 2 gets neither penalty nor its 5.
    logps = t(LOGPS, requires_grad=True)
    rewards, kl = ppo.token_rewards(t(SCORES), logps, t(REF), t(MASK3), kl_coef=0.1)
    close(kl, [[0.5, 0, 0.5], [-0.5, 0, 0], [0, 0, 0]])
    close(rewards, [[-0.05, 0, 1.95], [0.05, -1.0, 0], [0, 0, 0]])
    assert not rewards.requires_grad and not kl.requires_grad  # rollout constants


def test_token_rewards_k3_and_padding_never_overflows():
    # k3 = e^{log r} - log r - 1 with log r = ref - logps:
    #   log r = -0.5 -> e^-0.5 - 0.5 = 0.10653066 ; log r = +0.5 -> e^0.5 - 1.5 = 0.14872127 ; 0 -> 0
    a, b = math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5
    rewards, kl = ppo.token_rewards(t(SCORES), t(LOGPS), t(REF), t(MASK3), kl_coef=0.5, estimator="k3")
    close(kl, [[a, 0, a], [b, 0, 0], [0, 0, 0]])
    close(rewards, [[-0.5 * a, 0, 2 - 0.5 * a], [-0.5 * b, -1.0, 0], [0, 0, 0]])
    assert torch.isfinite(rewards).all()


def test_token_rewards_score_lands_on_the_last_counted_token_of_any_mask():
    # a mask that is not a right-padded prefix: the last counted position is 2, not 3.
    rewards, _ = ppo.token_rewards(t([3.0]), t([[0.0] * 4]), t([[0.0] * 4]), t([[0, 1, 1, 0]]), kl_coef=0.1)
    close(rewards, [[0, 0, 3.0, 0]])
    assert ppo.last_token_mask(t([[0, 1, 1, 0], [0, 0, 0, 0]])).tolist() == [
        [False, False, True, False],
        [False, False, False, False],
    ]


def test_token_rewards_rejects_bad_input():
    with pytest.raises(ValueError, match=r"scores has shape \(2,\), expected \(3,\)"):
        ppo.token_rewards(t([1.0, 2.0]), t(LOGPS), t(REF), t(MASK3), kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        ppo.token_rewards(t(SCORES), t(LOGPS), t(REF)[:, :2], t(MASK3), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        ppo.token_rewards(t(SCORES), t(LOGPS), t(REF), t(MASK3), kl_coef=-0.1)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        ppo.token_rewards(t(SCORES), t(LOGPS), t(REF), t(MASK3), kl_coef=0.1, estimator="k4")


# ------------------------------------------------------------------------------- adaptive_kl_coef


def test_adaptive_kl_coef_proportional_and_clipped():
    # target 6, horizon 10000, n_steps 512 -> gain n_steps / horizon = 0.0512
    #   kl 6.6: error 6.6/6 - 1 = 0.1          -> 0.1 * (1 + 0.1 * 0.0512) = 0.1 * 1.00512
    #   kl 12:  error 1, clipped to 0.2         -> 0.1 * (1 + 0.2 * 0.0512) = 0.1 * 1.01024
    #   kl 0:   error -1, clipped to -0.2       -> 0.1 * (1 - 0.2 * 0.0512) = 0.1 * 0.98976
    #   kl 6:   error 0                         -> unchanged
    def step(kl):
        return ppo.adaptive_kl_coef(0.1, kl, 512, target=6.0, horizon=10000)

    assert step(6.6) == pytest.approx(0.100512)
    assert step(torch.tensor(12.0)) == pytest.approx(0.101024)
    assert step(0.0) == pytest.approx(0.098976)
    assert step(6.0) == pytest.approx(0.1)
    assert ppo.adaptive_kl_coef(0.1, 100.0, 512, target=None, horizon=10000) == 0.1  # fixed
    with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
        ppo.adaptive_kl_coef(0.1, 1.0, 512, target=6.0, horizon=0)


# ---------------------------------------------------------------------------- missing_eos_penalty


def test_missing_eos_penalty():
    scores = t([1.0, 2.0, 3.0])
    has_eos = torch.tensor([True, False, True])
    close(ppo.missing_eos_penalty(scores, has_eos, 1.5), [1.0, 0.5, 3.0])  # only the truncated one
    close(ppo.missing_eos_penalty(scores, has_eos, None), [1.0, 2.0, 3.0])
    close(ppo.missing_eos_penalty(scores, has_eos, 0.0), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"has_eos has shape \(2,\)"):
        ppo.missing_eos_penalty(scores, has_eos[:2], 1.0)


# ------------------------------------------------------------------------------ moments and whiten

# counted values 1, 2, 3, 4 (the 100s are padding): count 4, sum 10, sum of squares 30;
# mean 2.5, deviations -1.5 -0.5 0.5 1.5, squared sum 5, unbiased var 5 / 3.
W_VALUES = [[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]]
W_MASK = [[1, 1, 1], [1, 0, 0]]


def test_masked_moments():
    moments = ppo.masked_moments(torch.tensor(W_VALUES), torch.tensor(W_MASK))
    assert moments.dtype == torch.float64
    close(moments, [4, 10, 30])


def test_whiten_unbiased_and_zero_off_mask():
    s = math.sqrt(5 / 3 + 1e-8)
    out = ppo.whiten(t(W_VALUES), t(W_MASK))
    close(out, [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0, 0]])
    # shift_mean=False: whitened, then the mean 2.5 added back
    out = ppo.whiten(t(W_VALUES), t(W_MASK), shift_mean=False)
    close(out, [[2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s], [2.5 + 1.5 / s, 0, 0]])
    assert ppo.whiten(torch.tensor(W_VALUES), torch.tensor(W_MASK)).dtype == torch.float32


def test_whiten_with_all_reduced_moments_of_two_halves_equals_the_whole():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=gen) * 3 + 1
    mask = (torch.arange(5) < torch.tensor([5, 3, 1, 4, 2, 5]).unsqueeze(-1)).long()
    whole = ppo.whiten(values, mask)
    halves = [(values[:3], mask[:3]), (values[3:], mask[3:])]
    summed = sum(ppo.masked_moments(v, m) for v, m in halves)  # what an all-reduce (SUM) gives
    joined = torch.cat([ppo.whiten(v, m, moments=summed) for v, m in halves])
    close(joined, whole, abs=1e-6)
    # while each half's own statistics give something else
    assert not torch.allclose(torch.cat([ppo.whiten(v, m) for v, m in halves]), whole, atol=1e-3)


def test_whiten_degenerate_counts():
    # one counted value: no spread, var 0 -> (x - x) = 0, or x itself with the mean kept; none counted: 0.
    close(ppo.whiten(t([[7.0, 9.0]]), t([[1, 0]])), [[0, 0]])
    close(ppo.whiten(t([[7.0, 9.0]]), t([[1, 0]]), shift_mean=False), [[7.0, 0]])
    close(ppo.whiten(t([[7.0, 9.0]]), t([[0, 0]])), [[0, 0]])
    with pytest.raises(ValueError, match=r"moments must be \(count, sum, sum of squares\)"):
        ppo.whiten(t(W_VALUES), t(W_MASK), moments=t([4.0, 10.0]))


# -------------------------------------------------------------------------------------------- gae


def test_gae_hand_worked():
    # gamma 0.9, lam 0.8 -> gamma * lam = 0.72; V after the last counted token is 0.
    # row 0, r = [0, 0, 1], V = [0.5, 0.4, 0.6]:
    #   t=2: delta = 1 + 0 - 0.6 = 0.4                 A2 = 0.4
    #   t=1: delta = 0 + 0.9 * 0.6 - 0.4 = 0.14        A1 = 0.14 + 0.72 * 0.4 = 0.428
    #   t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14       A0 = -0.14 + 0.72 * 0.428 = 0.16816
    #   returns = A + V = [0.66816, 0.828, 1.0]
    # row 1, mask [1, 1, 0], r = [-0.1, 2, (pad) 7], V = [1.0, 0.5, (pad) 9]:
    #   t=1: delta = 2 + 0 - 0.5 = 1.5                 A1 = 1.5
    #   t=0: delta = -0.1 + 0.9 * 0.5 - 1.0 = -0.65    A0 = -0.65 + 0.72 * 1.5 = 0.43
    #   returns = [1.43, 2.0, 0]
    # row 2: nothing counted -> all 0.
    rewards = t([[0.0, 0.0, 1.0], [-0.1, 2.0, 7.0], [1.0, 1.0, 1.0]])
    values = t([[0.5, 0.4, 0.6], [1.0, 0.5, 9.0], [1.0, 1.0, 1.0]], requires_grad=True)
    advantages, returns = ppo.gae(rewards, values, t(MASK3), gamma=0.9, lam=0.8)
    close(advantages, [[0.16816, 0.428, 0.4], [0.43, 1.5, 0], [0, 0, 0]])
    close(returns, [[0.66816, 0.828, 1.0], [1.43, 2.0, 0], [0, 0, 0]])
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_gamma_lam_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t, returns = the reward-to-go = 1 everywhere.
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.6]])
    advantages, returns = ppo.gae(rewards, values, t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.6, 0.4]])
    close(returns, [[1.0, 1.0, 1.0]])


def test_gae_bridges_a_hole_in_the_mask():
    # mask [1, 0, 1]: position 1 is skipped, so t=0 bootstraps from t=2 (gamma 0.9, lam 0.8):
    #   t=2: A = 1 - 0.6 = 0.4 ; t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04, A = 0.04 + 0.72 * 0.4 = 0.328
    rewards, values = t([[0.0, 99.0, 1.0]]), t([[0.5, 99.0, 0.6]])
    advantages, returns = ppo.gae(rewards, values, t([[1, 0, 1]]), gamma=0.9, lam=0.8)
    close(advantages, [[0.328, 0, 0.4]])
    close(returns, [[0.828, 0, 1.0]])


# ------------------------------------------------------------------------------------ value loss

# clip_range 0.2; per token (V, V_old, R) -> V_clip, (V - R)^2, (V_clip - R)^2, loss, clipped larger?, dloss/dV
#   (1.0, 0.5, 1.0) -> 0.7, 0,    0.09, 0.045, True,  0   (the clipped branch is constant in V)
#   (1.0, 0.5, 0.0) -> 0.7, 1,    0.49, 0.5,   False, V - R = 1
#   (0.6, 0.5, 0.0) -> 0.6, 0.36, 0.36, 0.18,  False, 0.6 (inside the range: both branches agree)
#   (0.0, 0.5, 1.0) -> 0.3, 1,    0.49, 0.5,   False, -1
#   (0.0, 0.5, 0.0) -> 0.3, 0,    0.09, 0.045, True,  0
# laid out as rows [tokens 1-3], [tokens 4-5, padding]
V = [[1.0, 1.0, 0.6], [0.0, 0.0, 50.0]]
V_OLD = [[0.5, 0.5, 0.5], [0.5, 0.5, 0.0]]
RET = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
V_MASK = [[1, 1, 1], [1, 1, 0]]


def test_clipped_value_loss_both_branches_and_gradient():
    values = t(V, requires_grad=True)
    loss, clipped = ppo.clipped_value_loss(values, t(V_OLD), t(RET), clip_range=0.2)
    close(loss[0], [0.045, 0.5, 0.18])
    close(loss[1, :2], [0.5, 0.045])
    assert clipped[:, :2].tolist() == [[True, False], [False, True]] and not clipped[0, 2]
    (loss * t(V_MASK)).sum().backward()
    close(values.grad, [[0.0, 1.0, 0.6], [-1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="clip_range must be >= 0"):
        ppo.clipped_value_loss(t(V), t(V_OLD), t(RET), clip_range=-0.1)


def test_ppo_value_loss_token_mean_metrics_and_gradient():
    # dapo token mean over the 5 counted tokens: (0.045 + 0.5 + 0.18 + 0.5 + 0.045) / 5 = 1.27 / 5 = 0.254
    # coef 0.5 -> loss 0.127; gradient 0.5 / 5 * [0, 1, 0.6, -1, 0]; the padding's 50 never counts.
    mask = t(V_MASK)
    weights, n = reduce.dapo(mask)
    values = t(V, requires_grad=True)
    out = ppo.ppo_value_loss(values, t(V_OLD), t(RET), mask, weights, n, clip_range=0.2, coef=0.5)
    close(out.loss, 0.127)
    close(out.metrics["loss/value_avg"], 0.254, abs=1e-7)
    close(out.metrics["val/clipfrac_avg"], 2 / 5, abs=1e-7)
    close(out.metrics["val/vpred"], (1 + 1 + 0.6 + 0 + 0) / 5, abs=1e-7)
    close(out.metrics["val/error"], (0 + 1 + 0.36 + 1 + 0) / 5, abs=1e-7)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.metrics.values())
    out.loss.backward()
    close(values.grad, [[0.0, 0.1, 0.06], [-0.1, 0.0, 0.0]])


def test_ppo_value_loss_same_gradient_for_any_micro_batch_split():
    # the engine's rescaling: each micro-batch loss (a mean over its n items) times n / global items
    mask = t(V_MASK)
    whole = t(V, requires_grad=True)
    w, n = reduce.dapo(mask)
    ppo.ppo_value_loss(whole, t(V_OLD), t(RET), mask, w, n, clip_range=0.2).loss.backward()
    split = t(V, requires_grad=True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 2)):
        w, m = reduce.dapo(mask[rows])
        out = ppo.ppo_value_loss(split[rows], t(V_OLD)[rows], t(RET)[rows], mask[rows], w, m, clip_range=0.2)
        total = total + out.loss * (m / n)
    total.backward()
    close(split.grad, whole.grad, abs=1e-12)


# ----------------------------------------------------------------------------------- policy loss


def _policy_batch(advantages) -> PolicyBatch:
    mask = t([[1, 1], [1, 0]])
    weights, n = reduce.dapo(mask)
    logps = t([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    return PolicyBatch(logps, mask, advantages, weights, n, old_logps=t([[-LN2, 0.0], [LN2, 0.0]]))


def test_ppo_policy_loss_per_token_advantages():
    # ratios exp(logps - old): [[2, 1], [0.5, (pad)]]; per-token advantages [[1, -1], [-1, (pad) 2]]; eps 0.2.
    #   (0,0) r 2,   A 1:  min(2, 1.2) = 1.2        -> loss -1.2, clipped high, no gradient
    #   (0,1) r 1,   A -1: min(-1, -1) = -1         -> loss 1,    gradient -A r = 1
    #   (1,0) r 0.5, A -1: min(-0.5, -0.8) = -0.8   -> loss 0.8,  clipped low, no gradient
    # token mean over 3: (-1.2 + 1 + 0.8) / 3 = 0.2; gradient [[0, 1/3], [0, 0]]
    batch = _policy_batch(t([[1.0, -1.0], [-1.0, 2.0]]))
    out = ppo.ppo_policy_loss(batch, clip_range=0.2)
    close(out.loss, 0.2)
    close(out.metrics["loss/policy_avg"], 0.2, abs=1e-7)
    close(out.metrics["policy/clipfrac_avg"], 2 / 3, abs=1e-7)
    close(out.metrics["val/ratio"], (2 + 1 + 0.5) / 3, abs=1e-7)
    # approxkl: 0.5 * (ln2^2 + 0 + ln2^2) / 3 = ln2^2 / 3
    close(out.metrics["policy/approxkl_avg"], LN2**2 / 3, abs=1e-7)
    assert "policy/entropy_avg" not in out.metrics
    out.loss.backward()
    close(batch.logps.grad, [[0.0, 1 / 3], [0.0, 0.0]])
    entropy = t([[1.0, 2.0], [3.0, 100.0]])
    out = ppo.ppo_policy_loss(batch._replace(entropy=entropy))
    close(out.metrics["policy/entropy_avg"], 2.0, abs=1e-7)  # (1 + 2 + 3) / 3


def test_grpo_loss_accepts_per_token_advantages():
    # (B, T) advantages constant along each row give exactly the (B,) loss and gradient.
    per_row = _policy_batch(t([1.0, -1.0]))
    per_token = _policy_batch(t([[1.0, 1.0], [-1.0, -1.0]]))
    a, b = grpo_loss(per_row), grpo_loss(per_token)
    close(b.loss, a.loss.item())
    a.loss.backward()
    b.loss.backward()
    close(per_token.logps.grad, per_row.logps.grad)
    with pytest.raises(ValueError, match=r"expected \(2,\) or \(2, 2\)"):
        grpo_loss(_policy_batch(t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])))


def test_approx_kl_ignores_padding():
    # 0.5 * (0.2^2 + 0.4^2) / 2 = 0.5 * 0.2 / 2 = 0.05; the padding's 100 is not counted
    close(ppo.approx_kl(t([[0.2, 0.0, 100.0]]), t([[0.0, 0.4, 0.0]]), t([[1, 1, 0]])), 0.05, abs=1e-7)


# ---------------------------------------------------------------------------------- rollout stats


def test_rollout_stats():
    # per-row kl sums: [0.5 + 0 + 0.5, -0.5 + 0 + (pad)] = [1.0, -0.5] -> objective/kl 0.25
    # non-score per row (kl_coef 0.1): [-0.1, 0.05] -> mean -0.025
    # rlhf reward: mean(2 - 0.1, -1 + 0.05) = mean(1.9, -0.95) = 0.475 ; scores mean 0.5
    scores, mask = t([2.0, -1.0]), t([[1, 1, 1], [1, 1, 0]])
    stats = ppo.rollout_stats(scores, t([[0.5, 0.0, 0.5], [-0.5, 0.0, 99.0]]), mask, kl_coef=0.1)
    close(stats["objective/kl"], 0.25, abs=1e-7)
    close(stats["objective/non_score_reward"], -0.025, abs=1e-7)
    close(stats["objective/rlhf_reward"], 0.475, abs=1e-7)
    close(stats["objective/scores"], 0.5, abs=1e-7)


def test_rollout_rlhf_reward_is_the_sum_of_token_rewards():
    # what PPO maximises is the undiscounted sum of the per-token rewards, averaged over completions
    rewards, kl = ppo.token_rewards(t(SCORES[:2]), t(LOGPS[:2]), t(REF[:2]), t(MASK3[:2]), kl_coef=0.3)
    stats = ppo.rollout_stats(t(SCORES[:2]), kl, t(MASK3[:2]), kl_coef=0.3)
    close(stats["objective/rlhf_reward"], rewards.sum(-1).mean(), abs=1e-6)


def test_rollout_stats_entropy_from_sampled_logps():
    # per-row sums of -logps over counted tokens: [1 + 2, 0.5] (padding 99 ignored) -> mean 1.75
    logps = t([[-1.0, -2.0], [-0.5, 99.0]])
    stats = ppo.rollout_stats(t([0.0, 0.0]), t([[0.0, 0.0], [0.0, 0.0]]), t([[1, 1], [1, 0]]), kl_coef=0.1, logps=logps)
    close(stats["objective/entropy"], 1.75, abs=1e-7)


# ---------------------------------------------------------------------------------- mini-batches


def test_minibatch_indices_epochs_cover_every_row_once():
    # 6 rows, mini-batches of 2, 3 epochs -> 3 * 3 = 9 mini-batches; each epoch's 3 hold rows 0..5 once
    batches = ppo.minibatch_indices(6, 2, ppo_epochs=3, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 9 and all(len(b) == 2 for b in batches)
    for epoch in range(3):
        assert sorted(torch.cat(batches[3 * epoch : 3 * epoch + 3]).tolist()) == [0, 1, 2, 3, 4, 5]
    again = ppo.minibatch_indices(6, 2, ppo_epochs=3, generator=torch.Generator().manual_seed(0))
    assert [b.tolist() for b in again] == [b.tolist() for b in batches]  # seeded: reproducible
    with pytest.raises(ValueError, match="rollout of 6 samples that is a positive multiple of mini_batch_size"):
        ppo.minibatch_indices(6, 4, ppo_epochs=1)
    with pytest.raises(ValueError, match="ppo_epochs=0"):
        ppo.minibatch_indices(6, 2, ppo_epochs=0)
