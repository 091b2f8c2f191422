"""The grpo stage on the tiny model: it learns a rule, resumes bitwise after SIGKILL, reads its reward
model as a declared input, and its per-algorithm keys are checked when composed."""

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
from align_runner.pipeline.graph import build_graph
from align_runner.pipeline.runner import input_stages, plan
from align_runner.pipeline.store import StageStore
from align_runner.validate import ConfigError, check_override_keys


def grpo_overrides(outputs: Path, cache: str, *extra: str, algorithm: str = "grpo") -> list[str]:
    """GRPO (or a variant) straight on the tiny base model, rewarded for even token ids."""
    return [
        "model=tiny",
        f"algorithm={algorithm}",
        "algorithm.stages=[data_prep,grpo]",
        f"paths.outputs={outputs}",
        f"paths.cache={cache}",
        "pipeline.eval=false",
        "data.prompt.train.limit=64",
        "~algorithm.rewards.accuracy",
        "+algorithm.rewards.even={_target_:cli_runner.even_token_reward,_partial_:true}",
        "algorithm.num_generations=8",
        "algorithm.prompts_per_rollout=4",
        "algorithm.generation.max_new_tokens=8",
        "algorithm.train.lr=3e-3",
        "algorithm.train.micro_batch_size=8",
        "train.progress=false",
        *extra,
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_rises_on_a_learnable_rule(tmp_path, model_cache):
    out = tmp_path / "out"
    api.run(grpo_overrides(out, model_cache, "algorithm.rollouts=24"))
    rows = [r for r in metrics(stage_dir(out, "grpo")) if "reward" in r]
    assert [r["step"] for r in rows] == list(range(1, 25))
    first = sum(r["reward"] for r in rows[:4]) / 4
    last = sum(r["reward"] for r in rows[-4:]) / 4
    assert 0.35 < first < 0.65  # a random policy: about half the ids are even
    assert last > first + 0.15, (first, last)
    for key in ("reward_std", "rewards/even/mean", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "entropy", "clip_ratio/region_mean", "policy_loss", "grad_norm"):
        assert key in rows[-1], key
    samples = [json.loads(line) for line in (stage_dir(out, "grpo") / "rollouts.jsonl").read_text().splitlines()]
    assert {s["rollout"] for s in samples} == set(range(1, 25)) and "completion" in samples[0]


SLOW_GRPO = [
    "algorithm.rollouts=8",
    "train.save_every=2",
    "train.keep_last=1",
    "+algorithm.rewards.even.delay=0.3",
    # off-policy passes and a KL term: the old and reference log-probs must resume too
    "algorithm.num_iterations=2",
    "algorithm.loss.beta=0.05",
]


def test_sigkill_mid_grpo_resumes_bitwise(tmp_path, model_cache):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    stage = kill_and_resume(grpo_overrides(killed, model_cache, *SLOW_GRPO), killed, "grpo", 8, cwd=tmp_path)
    api.run(grpo_overrides(clean, model_cache, *SLOW_GRPO))
    a, b = weights(stage), weights(stage_dir(clean, "grpo"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(stage) == metrics(stage_dir(clean, "grpo"))
    # the killed attempt's samples past the checkpoint are dropped, not repeated
    samples = (stage / "rollouts.jsonl").read_text()
    assert samples == (stage_dir(clean, "grpo") / "rollouts.jsonl").read_text() and samples


def test_reward_model_is_a_declared_input_whose_change_recomputes_grpo(tmp_path, model_cache):
    base = ["model=tiny", "algorithm=grpo_rm", f"paths.outputs={tmp_path}", f"paths.cache={model_cache}"]
    api.compose([*base, "~algorithm.rewards.accuracy"])  # the reward model alone is enough to score with
    specs = {s.name: s for s in build_graph(api.compose(base))}
    assert [s for s in specs] == ["data_prep", "sft", "reward", "eval_before", "grpo", "eval_after"]
    # the grpo stage sees its data, its starting model and the reward model: nothing else
    assert input_stages(specs["grpo"]) == {"data": "data_prep", "model": "sft", "reward_model": "reward"}
    # eval scores its generations with the pipeline's reward model too
    assert input_stages(specs["eval_after"]) == {"data": "data_prep", "model": "grpo", "reward_model": "reward"}

    def keys(*extra):
        return {p.spec.name: p.key for p in plan(api.compose([*base, *extra]), StageStore(tmp_path / "store"))}

    ref, rm_changed, eval_changed = keys(), keys("upstream.reward.train.lr=1e-3"), keys("eval.limit=3")
    assert rm_changed["reward"] != ref["reward"] and rm_changed["grpo"] != ref["grpo"]
    assert rm_changed["sft"] == ref["sft"]
    assert eval_changed["grpo"] == ref["grpo"]  # eval is no input of grpo
    assert rm_changed["eval_before"] != ref["eval_before"]  # ... but the reward model is one of eval


def test_grpo_scores_with_the_reward_model_of_its_pipeline(tmp_path, model_cache):
    out = tmp_path / "out"
    result = api.run(
        [
            "model=tiny", "algorithm=grpo_rm", f"paths.outputs={out}", f"paths.cache={model_cache}",
            "pipeline.eval=false", "data.sft.train.limit=32", "data.preference.train.limit=32",
            "data.prompt.train.limit=16", "train.max_steps=2", "train.progress=false",
            "algorithm.rollouts=2", "algorithm.num_generations=4", "algorithm.prompts_per_rollout=2",
            "algorithm.generation.max_new_tokens=4",
        ]
    )
    m = result.stage("grpo").metrics
    assert "rewards/reward_model/mean" in m and "rewards/accuracy/mean" in m
    assert m["rewards/reward_model/std"] > 0  # real scores of different completions, not a constant


def test_per_algorithm_keys_are_checked_when_composed():
    check_override_keys(["algorithm=grpo", "algorithm.num_generations=4", "algorithm.generation.top_p=0.9"])
    check_override_keys(["algorithm=dapo", "algorithm.loss.epsilon_high=0.3"])
    with pytest.raises(ConfigError, match="Did you mean 'num_generations'"):
        check_override_keys(["algorithm=grpo", "algorithm.num_generatons=4"])
    with pytest.raises(ConfigError, match="Did you mean 'max_new_tokens'"):
        check_override_keys(["algorithm=dapo", "algorithm.generation.max_new_token=4"])
    with pytest.raises(ConfigError, match="num_generations"):
        check_override_keys(["algorithm=sft", "algorithm.num_generations=4"])  # not an SFT key
    with pytest.raises(ConfigError, match="num_generations"):
        check_override_keys(["algorithm.num_generations=4"])  # the root default algorithm is sft
    # a sweep over algorithms accepts a key of any of them, and still suggests for typos
    check_override_keys(["algorithm=dpo,grpo", "algorithm.num_generations=4", "algorithm.reference.batch_size=4"])
    with pytest.raises(ConfigError, match="Did you mean 'num_generations'"):
        check_override_keys(["algorithm=dpo,grpo", "algorithm.num_generatons=4"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.num_generations=1", "algorithm.num_generations"),
        ("algorithm.prompts_per_rollout=6", "algorithm.prompts_per_rollout"),  # not a multiple of 4 steps
        ("algorithm.loss.bta=0.1", "Did you mean 'beta'"),
        ("~algorithm.rewards.accuracy", "at least one reward function, or a reward stage"),
    ],
)
def test_bad_grpo_config_fails_before_loading(override, message, model_cache, tmp_path):
    with pytest.raises(ConfigError, match=message):
        api.compose(["model=tiny", "algorithm=grpo", "algorithm.steps_per_rollout=4", f"paths.cache={model_cache}", override])


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_micro_batch_split_gives_the_same_update(aggregation, tmp_path, model_cache):
    """One rollout of 32 completions in one micro-batch or in eight: with SGD (lr 1) the update is the
    gradient itself, and every aggregation's num_items makes the two equal."""

    def update(micro: int):
        out = tmp_path / f"m{micro}"
        api.run(
            grpo_overrides(
                out, model_cache, "algorithm.rollouts=1", f"algorithm.train.micro_batch_size={micro}",
                f"algorithm.aggregation._target_=align_runner.algos.reduce.{aggregation}",
                "algorithm.train.lr=1.0", "algorithm.train.max_grad_norm=0",
                "algorithm.train.optimizer={_target_:torch.optim.SGD,_partial_:true}",
            )
        )
        return weights(stage_dir(out, "grpo"))

    whole, split = update(32), update(4)
    from safetensors.torch import load_file

    base = load_file(str(next(p for p in Path(model_cache).glob("tiny-*") if p.is_dir()) / "model.safetensors"))
    moved = max((whole[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-4  # the rollout had a gradient
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) < 1e-6 * max(moved, 1.0)


def test_completion_log_probs_match_the_unpadded_sequences(model_cache):
    """Left-padded prompts + right-padded completions, LM head on the completion columns only: every
    completion token's log-prob equals the one from its own unpadded sequence."""
    from align_runner.algos.logprobs import shifted_token_logps
    from align_runner.data.collate import collate_completions
    from align_runner.engine.backend import get_backend
    from align_runner.models.loading import load_causal_lm
    from align_runner.models.tiny import build_tiny
    from align_runner.stages.rollouts import completion_logps

    model = load_causal_lm(build_tiny(model_cache))
    rows = [
        {"prompt_ids": [5, 6, 7, 8, 9], "completion_ids": [10, 11]},
        {"prompt_ids": [12, 13], "completion_ids": [14, 15, 16, 17]},
        {"prompt_ids": [18, 19, 20], "completion_ids": [21]},
    ]
    batch = collate_completions(rows, pad_id=0)
    assert batch["input_ids"].shape == (3, 5 + 4)
    assert batch["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["position_ids"][1].tolist()[3:7] == [0, 1, 2, 3]  # two pads, then real positions
    got = completion_logps(model, batch, get_backend(api.compose(["model=tiny"]).hardware))
    for row, lps in zip(rows, got):
        n = len(row["completion_ids"])
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        want = shifted_token_logps(model(input_ids=ids).logits, ids)[0, -n:]
        assert lps[:n].tolist() == pytest.approx(want.tolist(), abs=1e-5)
        assert not lps[n:].any()  # padding carries 0


def test_shared_prompt_layout_gives_the_same_logps_and_gradients(model_cache):
    """Completions packed behind one copy of their prompt (4-D mask) compute what separate rows do."""
    from align_runner.algos.logprobs import token_logps
    from align_runner.data.collate import collate_completions
    from align_runner.models.loading import load_causal_lm
    from align_runner.models.tiny import build_tiny
    from align_runner.stages.rollouts import completion_logits

    model = load_causal_lm(build_tiny(model_cache))
    a, b = [5, 6, 7, 8, 9], [12, 13]
    rows = [
        {"prompt_ids": a, "completion_ids": [10, 11]},
        {"prompt_ids": b, "completion_ids": [14, 15, 16]},
        {"prompt_ids": a, "completion_ids": [21]},
        {"prompt_ids": a, "completion_ids": [22, 23, 24]},
    ]

    def logps_and_grads(share: bool):
        batch = collate_completions(rows, pad_id=0, share_prompts=share)
        model.zero_grad()
        logps = token_logps(completion_logits(model, batch), batch["completion_ids"]) * batch["completion_mask"]
        logps.sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters()]

    shared_batch = collate_completions(rows, pad_id=0, share_prompts=True)
    assert shared_batch["input_ids"].shape == (2, 5 + 3 * 3)  # 2 prompts, 3 slots of 3 columns
    (lp, g), (lp_shared, g_shared) = logps_and_grads(False), logps_and_grads(True)
    assert torch.allclose(lp, lp_shared, atol=1e-5)
    assert max((x - y).abs().max().item() for x, y in zip(g, g_shared)) < 1e-5


def test_filtered_completions_weigh_nothing_and_count_no_items():
    """Rows left out (zero-variance groups, truncated completions) keep their place in the batch but get
    zero token weights and are not counted in num_items; the kept rows' weights are the aggregation's."""
    from types import SimpleNamespace

    from align_runner.algos.reduce import grpo
    from align_runner.stages.grpo import GRPORollout

    rollout = object.__new__(GRPORollout)
    rollout.a = SimpleNamespace(share_prompts=False)
    rollout.ctx = SimpleNamespace(train=SimpleNamespace(micro_batch_size=8))
    rollout.tokenizer = SimpleNamespace(pad_token_id=0)
    rollout.aggregation, rollout.needs_old, rollout.with_ref = grpo, False, False
    examples = [
        {"prompt_ids": [5, 6], "completion_ids": [7, 8], "advantages": 0.5, "keep": True},
        {"prompt_ids": [5, 6], "completion_ids": [9], "advantages": 0.0, "keep": False},
        {"prompt_ids": [5, 6], "completion_ids": [10, 11, 12, 13], "advantages": -0.5, "keep": True},
    ]
    (batch,) = rollout._batches(examples, {"max_completion_length": 4, "mean_completion_tokens": 2.0})
    assert batch["num_items"] == 2.0  # two kept sequences
    assert batch["completion_mask"][1].sum() == 0 and batch["weights"][1].sum() == 0
    assert batch["weights"][0].tolist() == [0.5, 0.5, 0.0, 0.0]  # grpo: 1/|y| on the kept rows
    assert batch["weights"][2].tolist() == [0.25] * 4



@pytest.mark.parametrize("attn, shared", [(None, True), ("sdpa", True), ("flash_attention_2", False)])
def test_shared_prompts_only_where_the_attention_kernel_takes_the_mask(attn, shared):
    """flash-attention's varlen kernel takes no 4-D mask: share_prompts falls back to one row each."""
    from types import SimpleNamespace

    from align_runner.algos.reduce import grpo
    from align_runner.stages.grpo import GRPORollout

    rollout = object.__new__(GRPORollout)
    rollout.a = SimpleNamespace(share_prompts=True)
    rollout.ctx = SimpleNamespace(train=SimpleNamespace(micro_batch_size=8),
                                  cfg=SimpleNamespace(model={"attn_implementation": attn}))
    rollout.tokenizer = SimpleNamespace(pad_token_id=0)
    rollout.aggregation, rollout.needs_old, rollout.with_ref = grpo, False, False
    examples = [{"prompt_ids": [5, 6], "completion_ids": [7 + i], "advantages": 1.0, "keep": True} for i in range(2)]
    (batch,) = rollout._batches(examples, {"max_completion_length": 1, "mean_completion_tokens": 1.0})
    assert ("logit_index" in batch) == shared
    assert batch["input_ids"].shape == ((1, 4) if shared else (2, 3))  # one prompt, two slots / two rows

@pytest.mark.parametrize("variant", ["dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"])
def test_every_variant_trains(variant, tmp_path, model_cache):
    out = tmp_path / "out"
    result = api.run(grpo_overrides(out, model_cache, "algorithm.rollouts=2", algorithm=variant))
    m = result.stage("grpo").metrics
    assert m["completions/mean_length"] > 0 and "policy_loss" in m
    before = load_file(str(next(p for p in Path(model_cache).glob("tiny-*") if p.is_dir()) / "model.safetensors"))
    after = weights(stage_dir(out, "grpo"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it took optimizer steps


def test_eval_scores_generations_with_the_pipelines_reward_model(tmp_path, model_cache):
    result = api.run(
        [
            "model=tiny", "algorithm=grpo_rm", f"paths.outputs={tmp_path}", f"paths.cache={model_cache}",
            "data.sft.train.limit=32", "data.preference.train.limit=32", "data.prompt.train.limit=16",
            "train.max_steps=2", "train.progress=false", "algorithm.rollouts=1", "algorithm.num_generations=4",
            "algorithm.prompts_per_rollout=2", "algorithm.generation.max_new_tokens=4",
            "eval.limit=6", "eval.samples=6", "eval.max_new_tokens=4",
        ]
    )
    for name in ("eval_before", "eval_after"):
        samples = json.loads((Path(result.stage(name).dir) / "samples.json").read_text())
        scores = [s["reward_model"] for s in samples]
        assert len(scores) == 6 and len(set(scores)) > 1  # one real score per generation
        assert result.stage(name).metrics["reward_model"] == pytest.approx(sum(scores) / 6)
    plain = api.compose(["model=tiny", "algorithm=grpo", f"paths.outputs={tmp_path}"])
    assert all("reward_model" not in dict(s.inputs) for s in build_graph(plain))  # no reward stage, no input
