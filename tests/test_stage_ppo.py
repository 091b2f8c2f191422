"""The ppo stage on the tiny model: it learns a rule, resumes bitwise after SIGKILL (adaptive KL
coefficient included), reads its reward model as a declared input, saves a loadable critic, and bad
settings fail when composed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import (
    kill_and_resume,
    metrics,
    stage_dir,
    weights,
)
from safetensors.torch import load_file

from align_runner import api
from align_runner.algos.ppo import adaptive_kl_coef
from align_runner.pipeline.graph import build_graph
from align_runner.pipeline.runner import input_stages, plan
from align_runner.pipeline.store import StageStore
from align_runner.validate import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def ppo_overrides(outputs: Path, cache: str, *extra: str) -> list[str]:
    """PPO straight on the tiny base model (critic from the policy), rewarded for even token ids."""
    return [
        "model=tiny",
        "algorithm=ppo",
        "algorithm.stages=[data_prep,ppo]",
        "algorithm.critic.init=policy",
        f"paths.outputs={outputs}",
        f"paths.cache={cache}",
        "pipeline.eval=false",
        "data.prompt.train.limit=64",
        "+algorithm.rewards.even={_target_:cli_runner.even_token_reward,_partial_:true}",
        "algorithm.prompts_per_rollout=16",
        "algorithm.generation.max_new_tokens=8",
        "algorithm.train.lr=3e-3",
        "algorithm.critic.train.lr=3e-3",
        "algorithm.train.micro_batch_size=8",
        "train.progress=false",
        *extra,
    ]


def critic_weights(stage: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage / "critic" / "model.safetensors"))


def test_score_rises_on_a_learnable_rule(tmp_path, model_cache):
    out = tmp_path / "out"
    api.run(ppo_overrides(out, model_cache, "algorithm.rollouts=24", "algorithm.ppo_epochs=4", "algorithm.kl.kl_coef=0.01"))
    rows = metrics(stage_dir(out, "ppo"))
    assert [r["step"] for r in rows] == list(range(1, 25))
    first = sum(r["objective/scores"] for r in rows[:4]) / 4
    last = sum(r["objective/scores"] for r in rows[-4:]) / 4
    assert 0.35 < first < 0.65  # a random policy: about half the ids are even
    assert last > first + 0.25, (first, last)  # measured: 0.51 -> 0.97
    assert rows[0]["objective/kl"] == 0.0  # the first rollout samples from the reference itself
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "critic/lr", "critic/grad_norm"):
        assert key in rows[-1], key
    # the KL penalty is in the RLHF reward: scores - kl_coef x KL, per completion
    r = rows[-1]
    assert r["objective/kl"] > 0.1 and r["objective/kl_coef"] == 0.01
    assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] - 0.01 * r["objective/kl"], abs=1e-6)
    assert r["objective/non_score_reward"] == pytest.approx(-0.01 * r["objective/kl"], abs=1e-6)
    samples = [json.loads(line) for line in (stage_dir(out, "ppo") / "rollouts.jsonl").read_text().splitlines()]
    assert {s["rollout"] for s in samples} == set(range(1, 25)) and "completion" in samples[0]
    # every rollout's time split: the parts measured inside the rollout add up to at most all of it
    for r in metrics(stage_dir(out, "ppo"), drop=()):
        parts = [r[f"time/{k}"] for k in ("generation", "scoring", "reference", "values")]
        assert min(parts) > 0 and sum(parts) <= r["time/rollout"] and r["time/update"] > 0, r


SLOW_PPO = [
    "algorithm.rollouts=8",
    "train.save_every=2",
    "train.keep_last=1",
    "+algorithm.rewards.even.delay=0.3",
    # an adaptive coefficient (fast enough to move) and whitened rewards must resume exactly too
    "algorithm.kl.kl_coef=0.05",
    "algorithm.kl_control.target=0.01",
    "algorithm.kl_control.horizon=100",
    "algorithm.whiten_rewards=true",
]


def test_sigkill_mid_ppo_resumes_policy_and_critic_bitwise(tmp_path, model_cache):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    stage = kill_and_resume(ppo_overrides(killed, model_cache, *SLOW_PPO), killed, "ppo", 8, cwd=tmp_path)
    api.run(ppo_overrides(clean, model_cache, *SLOW_PPO))
    ref = stage_dir(clean, "ppo")
    for load in (weights, critic_weights):
        a, b = load(stage), load(ref)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics(stage)
    assert rows == metrics(ref)
    # the adaptive coefficient followed Ziegler et al.'s controller from rollout to rollout
    coefs = [r["objective/kl_coef"] for r in rows]
    assert coefs[0] == 0.05 and len(set(coefs)) > 1
    for r, nxt in zip(rows, coefs[1:]):
        assert nxt == adaptive_kl_coef(r["objective/kl_coef"], r["objective/kl"], 16, target=0.01, horizon=100)


def test_reward_model_is_a_declared_input_whose_change_recomputes_ppo(tmp_path, model_cache):
    base = ["model=tiny", "algorithm=ppo", f"paths.outputs={tmp_path}", f"paths.cache={model_cache}"]
    specs = {s.name: s for s in build_graph(api.compose(base))}
    assert [s for s in specs] == ["data_prep", "sft", "reward", "eval_before", "ppo", "eval_after"]
    # the ppo stage sees its data, its starting model and the reward model: nothing else
    assert input_stages(specs["ppo"]) == {"data": "data_prep", "model": "sft", "reward_model": "reward"}

    def keys(*extra):
        return {p.spec.name: p.key for p in plan(api.compose([*base, *extra]), StageStore(tmp_path / "store"))}

    ref, rm_changed, critic_changed = keys(), keys("upstream.reward.train.lr=1e-3"), keys("algorithm.critic.train.lr=1e-4")
    assert rm_changed["reward"] != ref["reward"] and rm_changed["ppo"] != ref["ppo"]
    assert rm_changed["sft"] == ref["sft"]
    assert critic_changed["ppo"] != ref["ppo"] and critic_changed["reward"] == ref["reward"]


def pipeline_overrides(outputs: Path, cache: str, *extra: str) -> list[str]:
    """data_prep -> reward -> ppo on the tiny model: the reward model scores and starts the critic."""
    return [
        "model=tiny", "algorithm=ppo", "algorithm.stages=[data_prep,reward,ppo]", f"paths.outputs={outputs}",
        f"paths.cache={cache}", "pipeline.eval=false", "data.preference.train.limit=32",
        "data.prompt.train.limit=16", "upstream.reward.train.max_steps=2", "train.progress=false",
        "algorithm.rollouts=2", "algorithm.prompts_per_rollout=8", "algorithm.generation.max_new_tokens=4",
        "algorithm.critic.train.lr=1e-2", *extra,
    ]


def test_reward_model_scores_starts_the_critic_and_its_retraining_recomputes_ppo(tmp_path, model_cache, count_optimizer_steps):
    from transformers import AutoModelForTokenClassification

    out = tmp_path / "out"
    first = api.run(pipeline_overrides(out, model_cache))
    m = first.stage("ppo").metrics
    assert "rewards/reward_model/mean" in m and m["objective/scores"] == m["rewards/reward_model/mean"]
    ppo = stage_dir(out, "ppo")
    rm = load_file(str(stage_dir(out, "reward") / "model" / "model.safetensors"))
    critic = critic_weights(ppo)
    # the critic is the reward model's backbone and head, trained on: same tensors, moved values
    assert critic.keys() == rm.keys()
    assert any(not torch.equal(critic[k], rm[k]) for k in rm)
    loaded = AutoModelForTokenClassification.from_pretrained(str(ppo / "critic"))
    assert loaded.config.num_labels == 1 and loaded.score.bias is None
    assert torch.equal(loaded.score.weight, critic["score.weight"])

    # the report plots the PPO metrics and shows the sampled completions
    from align_runner.engine.trackers import read_metrics
    from align_runner.report import plotted_panels

    titles = [t for t, _, _ in plotted_panels(read_metrics(ppo / "metrics.jsonl"))]
    for title in ("PPO: score and RLHF reward", "PPO: KL to the reference", "PPO: losses", "PPO: clipped fraction",
                  "PPO: approx KL to the rollout policy", "PPO: ratio to the rollout policy", "PPO: entropy"):
        assert title in titles, title
    report = (first.run_dir / "report.md").read_text()
    assert "## Rollouts of ppo" in report and (first.run_dir / "report" / "train_ppo.png").exists()

    steps = count_optimizer_steps["n"]
    again = api.run(pipeline_overrides(out, model_cache))
    assert all(s.cache_hit for s in again.stages) and count_optimizer_steps["n"] == steps  # no work at all

    retrained = api.run(pipeline_overrides(out, model_cache, "upstream.reward.train.lr=1e-3"))
    hits = {s.name: s.cache_hit for s in retrained.stages}
    assert hits == {"data_prep": True, "reward": False, "ppo": False}
    assert retrained.stage("ppo").key != first.stage("ppo").key


def test_critic_starts_from_the_reward_model_or_at_zero(tiny_dir, tmp_path):
    from align_runner.models.critic import completion_values, load_critic
    from align_runner.models.loading import load_sequence_classifier, load_tokenizer, save_pretrained_atomic
    from align_runner.models.scorer import RewardModelScorer

    torch.manual_seed(0)
    save_pretrained_atomic(load_sequence_classifier(tiny_dir), load_tokenizer(tiny_dir), str(tmp_path / "rm"))
    from align_runner.data.collate import collate_completions

    rows = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9]}, {"prompt_ids": [10], "completion_ids": [11, 12, 13]}]
    batch = collate_completions(rows, pad_id=0)
    with torch.no_grad():
        values = completion_values(load_critic(str(tmp_path / "rm"), init="reward"), batch)
        zeros = completion_values(load_critic(tiny_dir, init="policy"), batch)
    # V before the last completion token is the reward model's score of everything before it
    scores = RewardModelScorer(str(tmp_path / "rm"))(prompt_ids=[[5, 6, 7], [10, 11, 12]], completion_ids=[[8], []])
    assert values.shape == (2, 3) and values[0, 1].item() == pytest.approx(scores[0], abs=1e-5)
    assert values[1, 2].item() == pytest.approx(scores[1], abs=1e-5)
    assert torch.equal(zeros, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="has no reward head"):
        load_critic(tiny_dir, init="reward")


def test_micro_batch_split_gives_the_same_update(tmp_path, model_cache):
    """One rollout in micro-batches of 16 or of 4: with SGD (lr 1) the update is the gradient itself,
    and the token mean's num_items makes the two equal, for the policy and for the critic."""

    def update(micro: int):
        out = tmp_path / f"m{micro}"
        sgd = "{_target_:torch.optim.SGD,_partial_:true}"
        api.run(
            ppo_overrides(
                out, model_cache, "algorithm.rollouts=1", "algorithm.ppo_epochs=1", "algorithm.steps_per_rollout=1",
                f"algorithm.train.micro_batch_size={micro}", "algorithm.train.lr=1.0", "algorithm.critic.train.lr=1.0",
                "algorithm.train.max_grad_norm=0", f"algorithm.train.optimizer={sgd}",
            )
        )
        stage = stage_dir(out, "ppo")
        return weights(stage), critic_weights(stage)

    whole, split = update(16), update(4)
    base = load_file(str(next(p for p in Path(model_cache).glob("tiny-*") if p.is_dir()) / "model.safetensors"))
    for a, b in zip(whole, split):
        # the critic starts as the base backbone with a zero head (score.weight)
        moved = max((a[k] - base.get(k, torch.zeros_like(a[k]))).abs().max().item() for k in a)
        assert moved > 1e-4  # the rollout had a gradient
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5 * max(moved, 1.0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("~algorithm.rewards.even", "at least one reward function, or a reward stage"),
        ("algorithm.critic.init=reward", "algorithm.critic.init='reward': expected a reward stage in the pipeline"),
        ("algorithm.prompts_per_rollout=6", "algorithm.prompts_per_rollout=6: expected a multiple of steps_per_rollout"),
        ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs=0: expected an integer >= 1"),
        ("algorithm.kl.estimator=k4", "algorithm.kl.estimator='k4': expected one of \\['k1', 'k2', 'k3'\\]$"),
        ("algorithm.kl.kl_coef=-0.1", "algorithm.kl.kl_coef=-0.1: expected >= 0 \\(the first rollout's coefficient\\)$"),
        ("~algorithm.kl.kl_coef", "algorithm.kl.kl_coef=None: expected >= 0"),
        ("algorithm.kl_control.target=0", "algorithm.kl_control.target=0: expected > 0, or null for a fixed kl.kl_coef$"),
        ("algorithm.kl_control.horizon=-5", "algorithm.kl_control.horizon=-5: expected > 0 \\(completions\\)$"),
        ("algorithm.advantage.lam=1.5", "algorithm.advantage.lam=1.5: expected a number in \\[0, 1\\]$"),
        ("algorithm.advantage.gamma=-1", "algorithm.advantage.gamma=-1: expected a number in \\[0, 1\\]$"),
        ("algorithm.advantage=null", "algorithm.advantage=None: expected a _target_ node"),
        ("algorithm.advantage.lamda=0.9", "algorithm.advantage.lamda: align_runner.algos.ppo.gae has no parameter 'lamda'"),
        ("algorithm.kl_target=6", "'kl_target' is not a key of algorithm. Valid keys: .*kl_control"),
        ("algorithm.critic.train.lr=0", "algorithm.critic.train.lr=0"),
        ("algorithm.critic.init=value", "critic.init"),
        ("algorithm.ppo_epoch=2", "Did you mean 'ppo_epochs'"),
        ("algorithm.critic.loss.clip_rang=0.1", "Did you mean 'clip_range'"),
    ],
)
def test_bad_ppo_config_fails_before_loading(override, message, model_cache, tmp_path):
    with pytest.raises(ConfigError, match=message):
        api.compose(ppo_overrides(tmp_path, model_cache, "algorithm.steps_per_rollout=4", override))


def test_kl_coefficient_is_fixed_or_resumes_from_the_stage_dir(tmp_path):
    """A fixed coefficient needs no file; an adaptive one is read back by a restarted stage."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from align_runner.stages.ppo import KL_COEF_FILE, KLCoefficient

    backend = SimpleNamespace(is_main=True, broadcast_object=lambda obj: obj)
    def ppo_cfg(target):
        control = {"_target_": "align_runner.algos.ppo.adaptive_kl_coef", "_partial_": True, "target": target, "horizon": 100}
        return OmegaConf.create({"kl": {"kl_coef": 0.1}, "kl_control": control})

    fixed_cfg = ppo_cfg(None)
    KLCoefficient(fixed_cfg, tmp_path, backend).update(0, kl=3.0, n_steps=16)
    assert KLCoefficient(fixed_cfg, tmp_path, backend).at(7) == 0.1  # a resumed run at rollout 7
    assert not (tmp_path / KL_COEF_FILE).exists()

    cfg = ppo_cfg(1.0)
    run = KLCoefficient(cfg, tmp_path, backend)
    # error = kl / target - 1, clipped to [-0.2, 0.2]: 3.0 -> +0.2, 0.9 -> -0.1; factor 1 + error x 16 / 100
    for i, kl in enumerate([3.0, 0.9]):
        run.update(i, kl=kl, n_steps=16)
    assert run.at(1) == pytest.approx(0.1 * 1.032) and run.at(2) == pytest.approx(0.1 * 1.032 * 0.984)
    resumed = KLCoefficient(cfg, tmp_path, backend)
    assert resumed.at(2) == run.at(2)  # bit for bit, read from the stage dir
    with pytest.raises(RuntimeError, match="no KL coefficient for rollout 3"):
        resumed.at(3)
