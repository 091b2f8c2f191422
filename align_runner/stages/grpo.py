"""grpo: Group Relative Policy Optimization (Shao et al. 2024) and its variants, online on the prompt view.

Each rollout samples ``num_generations`` completions for each of ``prompts_per_rollout`` prompts, scores
them with the reward functions (and the pipeline's reward model, when it has a ``reward`` stage),
turns the rewards into advantages (``algorithm.advantage``: group-normalised, RLOO, REINFORCE++) and
takes ``steps_per_rollout`` x ``num_iterations`` optimizer steps on the policy loss
(``algorithm.loss``: clipped surrogate, clip-higher, GSPO's sequence ratio, optional KL to the frozen
input model) aggregated by ``algorithm.aggregation`` (grpo, dr_grpo, dapo, bnpo).

Prompt j of rollout i is drawn from (seed, i) and its g-th completion is sampled from a seed of (seed,
i, j, g); the prompts of each optimizer step are dealt out to the processes in equal blocks with whole
groups, so 2 processes train on what 1 process does, and a resumed run on what the uninterrupted run did.
Metrics use TRL's names: reward, reward_std, rewards/<fn>/mean, frac_reward_zero_std,
completions/{mean,min,max}_length, completions/clipped_ratio, kl, entropy, clip_ratio/*, policy_loss.
"""

from __future__ import annotations

from functools import partial

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from align_runner.algos.advantages import zero_std_groups
from align_runner.algos.rewards import reward_metrics
from align_runner.data.collate import collate_completions
from align_runner.engine.metric_names import online
from align_runner.engine.online import Rollout, Update, fit_online
from align_runner.engine.rollout import row_seed
from align_runner.models.loading import takes_attention_masks
from align_runner.models.peft import is_peft_model
from align_runner.registry import HeldModels, Input, register_stage
from align_runner.stages.context import StageContext
from align_runner.stages.rollouts import (
    check_rollout_sizes,
    check_scorers,
    completion_logps,
    global_rows,
    held_reward_model,
    make_generator,
    policy_step,
    rank_prompts,
    reference_logps,
    reward_functions,
    reward_names,
    rollout_order,
    sample,
    score,
)
from align_runner.validate import require


def check_grpo(cfg, spec) -> None:
    """Compose-time check: the sizes fit together and something scores the completions."""
    a, where = OmegaConf.select(cfg, spec.config), spec.config
    require(a.num_generations >= 2, f"{where}.num_generations", "an integer >= 2 (advantages compare the completions of one prompt)", a.num_generations)
    check_rollout_sizes(a, cfg, where, ("rollouts", "steps_per_rollout", "num_iterations", "prompts_per_rollout"))
    check_scorers(a, spec, where)


def grpo_metrics(rewards: list[str]) -> tuple[str, ...]:
    """A rollout's (``reward_metrics`` and the completions') and its steps' (``algos.grpo`` loss)."""
    completions = [f"completions/{m}" for m in ("mean_length", "min_length", "max_length", "clipped_ratio")]
    per_fn = [f"rewards/{name}/{m}" for name in rewards for m in ("mean", "std")]
    clip = [f"clip_ratio/{m}_mean" for m in ("low", "high", "region")]
    return online("reward", "reward_std", "frac_reward_zero_std", *per_fn, *completions, "num_tokens",
                  "policy_loss", *clip, "kl", "entropy")


def grpo_held(cfg, spec) -> HeldModels:
    """The frozen reference when the loss has a KL term (``beta`` > 0) outside LoRA, and the reward
    model when the pipeline binds one."""
    beta = float(OmegaConf.select(cfg, spec.config).loss.get("beta", 0.0))
    return HeldModels(frozen=int(beta > 0 and cfg.model.lora is None) + held_reward_model(spec))


@register_stage(
    "grpo",
    trains=True,
    views=("prompt",),
    inputs={"reward_model": Input("reward", required=False, what="its reward model")},
    key_metrics=("reward", "reward_std", "completions/mean_length", "frac_reward_zero_std"),
    check=check_grpo,
    metrics=lambda cfg, spec: grpo_metrics(reward_names(cfg, spec)),
    held=grpo_held,
)
def run_grpo(ctx: StageContext) -> dict[str, float]:
    a, backend = ctx.section, ctx.backend
    tokenizer = ctx.tokenizer()
    prompts = ctx.dataset("prompt", "train")
    engine = ctx.engine()
    total = int(a.rollouts) * int(a.num_iterations) * int(a.steps_per_rollout)
    state = engine.setup(ctx.load_policy(), total_steps=total)
    loss_cfg = OmegaConf.to_container(a.loss, resolve=True)
    beta = float(loss_cfg.get("beta", 0.0))
    reference = None
    if beta > 0 and not is_peft_model(backend.unwrap(state.model)):
        # a frozen copy of the input model; under LoRA the adapter-disabled policy is the reference
        reference = ctx.load_frozen_policy()
    rollout = GRPORollout(ctx, state, tokenizer, prompts, reward_functions(ctx), reference, with_ref=beta > 0)
    result = fit_online(
        engine,
        updates=[Update(state, partial(policy_step, loss_fn=instantiate(a.loss)))],
        rollouts=int(a.rollouts),
        make_rollout=rollout,
        epochs=int(a.num_iterations),
    )
    ctx.save_model(state.model, tokenizer)
    return result.metrics


class GRPORollout:
    """``make_rollout`` for ``fit_online``: sample, score, compute advantages, build the step batches."""

    def __init__(self, ctx: StageContext, state, tokenizer, prompts: list[dict], rewards, reference, *, with_ref: bool):
        a = ctx.section
        self.ctx, self.a, self.state, self.backend = ctx, a, state, ctx.backend
        self.prompts, self.rewards, self.reference, self.with_ref = prompts, rewards, reference, with_ref
        self.tokenizer = tokenizer
        self.G, self.P, self.S = int(a.num_generations), int(a.prompts_per_rollout), int(a.steps_per_rollout)
        if not prompts:
            raise ValueError("the prompt view's train split is empty; GRPO has nothing to sample from")
        self.generator = make_generator(a.generation, ctx.backend.unwrap(state.model), tokenizer)
        self.advantage = instantiate(a.advantage)
        self.aggregation = instantiate(a.aggregation)
        # off-policy steps (a second pass, or later steps of a split rollout) need the sampling policy's log-probs
        self.needs_old = int(a.num_iterations) > 1 or self.S > 1

    def __call__(self, i: int) -> Rollout:
        a, backend, G = self.a, self.backend, self.G
        seed = int(self.ctx.cfg.seed)
        order = rollout_order(len(self.prompts), self.P, i, seed)
        blocks = rank_prompts(order, self.S, backend.rank, backend.world_size)
        local = [(j, idx) for block in blocks for j, idx in block]
        rows = [self.prompts[idx] for _, idx in local for _ in range(G)]
        seeds = [row_seed(seed, i, j, g) for j, _ in local for g in range(G)]
        positions = [j * G + g for j, _ in local for g in range(G)]
        completions = sample(self.generator, self.state.model, [r["prompt_ids"] for r in rows], seeds, backend)
        ids = [c.ids for c in completions]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)

        scores = score(self.rewards, a.reward_weights, rows, texts, ids)
        size = self.P * G
        stats = torch.stack(
            [scores.total, *scores.per_function.values(), torch.tensor([float(c.truncated) for c in completions]),
             torch.tensor([float(len(x)) for x in ids])], dim=1
        )
        full = global_rows(stats, positions, size, backend)
        total = torch.nan_to_num(full[:, 0].float(), nan=0.0)  # a row no function applied to scores 0
        per_fn = {name: full[:, 1 + k].float() for k, name in enumerate(scores.per_function)}
        truncated, lengths = full[:, -2].bool(), full[:, -1]
        advantages = self.advantage(total, G)
        keep = torch.ones(size, dtype=torch.bool)
        if a.filter_zero_std_groups:
            keep &= ~zero_std_groups(total, G)
        if a.mask_truncated_completions:
            keep &= ~truncated
        kept_tokens = float(lengths[keep].sum())
        context = {
            "max_completion_length": int(a.generation.max_new_tokens),
            "mean_completion_tokens": max(kept_tokens / max(int(keep.sum()), 1), 1.0),
        }

        examples = [
            {"prompt_ids": r["prompt_ids"], "completion_ids": c, "advantages": float(advantages[p]), "keep": bool(keep[p])}
            for r, c, p in zip(rows, ids, positions)
        ]
        per_step = len(examples) // self.S
        steps = [self._batches(examples[k * per_step : (k + 1) * per_step], context) for k in range(self.S)]
        metrics = reward_metrics(type(scores)(total, per_fn), G)
        metrics.update(
            {
                "completions/mean_length": float(lengths.mean()),
                "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(truncated.float().mean()),
                "num_tokens": float(lengths.sum()),
            }
        )
        samples = [
            {"prompt": r.get("prompt_text", ""), "completion": t, "reward": float(s)}
            for r, t, s in list(zip(rows, texts, scores.total.tolist()))[: max(int(a.samples), 0)]
        ]
        return Rollout(steps, metrics, samples)

    def _batches(self, examples: list[dict], context: dict) -> list[dict]:
        mb = int(self.ctx.train.micro_batch_size)
        share = bool(self.a.share_prompts) and takes_attention_masks(self.ctx.cfg.model)
        collate = partial(collate_completions, pad_id=self.tokenizer.pad_token_id, share_prompts=share)
        batches = []
        for start in range(0, len(examples), mb):
            batch = collate(examples[start : start + mb])
            if self.needs_old:
                batch["old_logps"] = completion_logps(self.state.model, batch, self.backend)
            if self.with_ref:
                batch["ref_logps"] = reference_logps(self.reference, self.state.model, batch, self.backend)
            keep = torch.tensor(batch.pop("keep"), dtype=torch.bool)
            mask = batch["completion_mask"] * keep[:, None]
            weights, num_items = torch.zeros(mask.shape), 0.0
            if keep.any():
                w, num_items = self.aggregation(mask[keep], **context)
                weights[keep] = w
            batch.update(completion_mask=mask, weights=weights, num_items=num_items)
            batches.append(batch)
        return batches
