"""ppo: PPO with a learned critic (classic RLHF: Ziegler et al. 2019; Ouyang et al. 2022), online on the
prompt view.

Each rollout samples one completion for each of ``prompts_per_rollout`` prompts and scores it (the
pipeline's reward model, read at the completion's last token, plus any reward functions, weighted),
with ``missing_eos_penalty`` off a completion that never ended. Per-token rewards (``algorithm.kl``)
are the score at the last token minus ``kl_coef`` x the KL to the frozen input model (the
adapter-disabled policy under LoRA); ``algorithm.kl_control.target`` makes the coefficient adaptive.
``algorithm.advantage`` (GAE) over the critic's values gives advantages (whitened over the whole
rollout, every process's rows) and value targets; the rollout is then split
into ``steps_per_rollout`` mini-batches and passed over ``ppo_epochs`` times, each optimizer step
updating the policy (``algorithm.loss``, a clipped surrogate) and the critic (``algorithm.critic.loss``,
a clipped value loss), each with its own optimizer and schedule (``algorithm.critic.train``).

The critic (``models/critic.py``) starts from the reward model (``critic.init=reward``) or the policy,
and is saved beside the policy as ``critic/``. Metrics use the names PPO users know: objective/kl,
objective/entropy, objective/non_score_reward, objective/rlhf_reward, objective/scores, val/num_eos_tokens
per rollout (over every process); policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg, val/ratio,
loss/value_avg, val/clipfrac_avg per optimizer step. Each rollout row also has the main process's time
split in seconds: time/generation, time/scoring (reward model and functions), time/reference (the
reference's log-probs), time/values (the old log-probs and the critic's values), and fit_online's
time/rollout (all of those and the rest of the rollout) and time/update (both models' optimizer steps).
"""

from __future__ import annotations

import json
from functools import partial

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from align_runner.algos.kl import KL_ESTIMATORS
from align_runner.algos.logprobs import masked_sum
from align_runner.algos.ppo import masked_moments, missing_eos_penalty, rollout_stats, whiten
from align_runner.config import stage_train
from align_runner.data.collate import collate_completions
from align_runner.engine.metric_names import online
from align_runner.engine.online import Rollout, Update, fit_online, timed
from align_runner.engine.rollout import row_seed
from align_runner.fsutil import atomic_write_json
from align_runner.models.critic import completion_values, load_critic
from align_runner.models.loading import enable_gradient_checkpointing, save_pretrained_atomic
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

# the adaptive KL coefficient of every rollout so far, in the stage dir (see KLCoefficient)
KL_COEF_FILE = "kl_coef.json"
# the critic's folder in the stage dir (the policy is in model/)
CRITIC_DIR = "critic"


def value_step(model, batch: dict, *, loss_fn):
    """The critic's loss on one micro-batch (mean over the aggregation's ``num_items``)."""
    values = completion_values(model, batch)
    return loss_fn(
        values,
        batch["old_values"].to(values.dtype),
        batch["returns"].to(values.dtype),
        batch["completion_mask"],
        batch["weights"],
        float(batch["num_items"]),
    )


@torch.no_grad()
def old_values(model, batch: dict, backend) -> torch.Tensor:
    """The critic's values (B, C) of a batch at rollout time, on the CPU (0 on padding)."""
    on_device = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with backend.autocast():
        values = completion_values(model, on_device)
    return (values.float() * on_device["completion_mask"]).cpu()


def critic_train(cfg, section):
    """The critic's train settings: the stage's (``train`` changed by ``algorithm.train``), then changed
    by ``algorithm.critic.train``."""
    return stage_train(OmegaConf.create({"train": stage_train(cfg, section)}), section.critic)


def check_ppo(cfg, spec) -> None:
    """Compose-time check: sizes, KL and GAE settings, something to score with, a critic to start from.
    The keys of ``kl``, ``kl_control`` and ``advantage`` are checked where present (another ``_target_``
    may have other parameters); ``kl.kl_coef`` must be, it is the first rollout's coefficient."""
    a, where = OmegaConf.select(cfg, spec.config), spec.config
    check_rollout_sizes(a, cfg, where, ("rollouts", "steps_per_rollout", "ppo_epochs", "prompts_per_rollout"))
    check_scorers(a, spec, where)
    for key in ("kl", "kl_control", "advantage"):
        node = a.get(key)
        require(isinstance(node, DictConfig) and "_target_" in node, f"{where}.{key}", "a _target_ node (see algorithm/ppo.yaml)", node)
    kl, control, advantage = a.kl, a.kl_control, a.advantage
    coef = kl.get("kl_coef")
    require(coef is not None and coef >= 0, f"{where}.kl.kl_coef", ">= 0 (the first rollout's coefficient)", coef)
    estimator = kl.get("estimator", "k1")
    require(estimator in KL_ESTIMATORS, f"{where}.kl.estimator", f"one of {sorted(KL_ESTIMATORS)}", estimator)
    target, horizon = control.get("target"), control.get("horizon", 1)
    require(target is None or target > 0, f"{where}.kl_control.target", "> 0, or null for a fixed kl.kl_coef", target)
    require(horizon is not None and horizon > 0, f"{where}.kl_control.horizon", "> 0 (completions)", horizon)
    for key in ("gamma", "lam"):
        value = advantage.get(key, 0)
        require(value is not None and 0 <= value <= 1, f"{where}.advantage.{key}", "a number in [0, 1]", value)
    penalty = a.missing_eos_penalty
    require(penalty is None or penalty >= 0, f"{where}.missing_eos_penalty", ">= 0, or null for none", penalty)
    has_rm = any(role == "reward_model" for role, _ in spec.inputs)
    require(
        str(a.critic.init) != "reward" or has_rm,
        f"{where}.critic.init",
        "a reward stage in the pipeline to start the critic from (add reward to algorithm.stages), or critic.init=policy",
        str(a.critic.init),
    )
    t = critic_train(cfg, a)
    require(t.lr > 0, f"{where}.critic.train.lr", "a positive learning rate", t.lr)


def ppo_metrics(rewards: list[str]) -> tuple[str, ...]:
    """A rollout's (``rollout_stats`` and ``_metrics`` above, its phases' seconds) and its steps' (the
    policy's ``algos.ppo`` names, the critic's value-loss names and its engine names under ``critic/``)."""
    objective = [f"objective/{m}" for m in ("kl", "non_score_reward", "rlhf_reward", "scores", "entropy", "kl_coef")]
    completions = [f"completions/{m}" for m in ("mean_length", "min_length", "max_length", "clipped_ratio")]
    times = [f"time/{m}" for m in ("generation", "scoring", "reference", "values")]
    policy = ["loss/policy_avg", "policy/clipfrac_avg", "policy/approxkl_avg", "policy/entropy_avg", "val/ratio"]
    critic = ["loss/value_avg", "val/clipfrac_avg", "val/vpred", "val/error", *(f"critic/{m}" for m in ("loss", "lr", "grad_norm"))]
    return online(*objective, "val/num_eos_tokens", "reward", *(f"rewards/{n}/mean" for n in rewards), *completions,
                  *times, *policy, *critic)


def ppo_held(cfg, spec) -> HeldModels:
    """The frozen reference (none under LoRA: the adapter-disabled policy is it), the reward model when
    the pipeline binds one, and the critic, trained beside the policy."""
    return HeldModels(frozen=int(cfg.model.lora is None) + held_reward_model(spec), trained=1)


@register_stage(
    "ppo",
    trains=True,
    views=("prompt",),
    inputs={"reward_model": Input("reward", required=False, what="its reward model")},
    key_metrics=("objective/scores", "objective/rlhf_reward", "objective/kl", "loss/value_avg"),
    check=check_ppo,
    metrics=lambda cfg, spec: ppo_metrics(reward_names(cfg, spec)),
    held=ppo_held,
)
def run_ppo(ctx: StageContext) -> dict[str, float]:
    a, backend = ctx.section, ctx.backend
    tokenizer = ctx.tokenizer()
    prompts = ctx.dataset("prompt", "train")
    engine = ctx.engine()
    total = int(a.rollouts) * int(a.ppo_epochs) * int(a.steps_per_rollout)
    policy = engine.setup(ctx.load_policy(), total_steps=total)
    critic = engine.setup(load_stage_critic(ctx), total_steps=total, name="critic", train=critic_train(ctx.cfg, a))
    # a frozen copy of the input model; under LoRA the adapter-disabled policy is the reference
    reference = None if is_peft_model(backend.unwrap(policy.model)) else ctx.load_frozen_policy()
    rollout = PPORollout(ctx, policy, critic, tokenizer, prompts, reward_functions(ctx), reference)
    result = fit_online(
        engine,
        updates=[
            Update(policy, partial(policy_step, loss_fn=instantiate(a.loss))),
            Update(critic, partial(value_step, loss_fn=instantiate(a.critic.loss))),
        ],
        rollouts=int(a.rollouts),
        make_rollout=rollout,
        epochs=int(a.ppo_epochs),
    )
    ctx.save_model(policy.model, tokenizer)
    save_critic(ctx, critic.model, tokenizer)
    return result.metrics


def load_stage_critic(ctx: StageContext):
    """The critic this stage starts from (``algorithm.critic.init``), on the device; trained in full."""
    init = str(ctx.section.critic.init)
    source = ctx.input_dir("reward_model") / "model" if init == "reward" else ctx.input_model_path()
    critic = load_critic(str(source), init=init, dtype=ctx.dtype)
    if ctx.cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(critic)
    return critic.to(ctx.backend.device)


def save_critic(ctx: StageContext, model, tokenizer) -> None:
    """The critic in Hugging Face layout under ``<stage>/critic`` (collective: sharded weights are gathered)."""
    state = ctx.backend.full_state_dict(model)
    if ctx.is_main:
        save_pretrained_atomic(ctx.backend.unwrap(model), tokenizer, str(ctx.out_dir / CRITIC_DIR), state_dict=state)
    ctx.backend.barrier()


class KLCoefficient:
    """The KL coefficient of each rollout: ``kl.kl_coef``, moved by ``kl_control`` (Ziegler et al.'s
    adaptive controller) unless its ``target`` is null.

    The adaptive value depends on every earlier rollout's KL, which no checkpoint holds; the main process
    writes each rollout's coefficient to ``kl_coef.json`` as it is computed (before the rollout's
    updates, so before any checkpoint that follows them), and a resumed run reads the one for the
    rollout it continues from: the value the uninterrupted run had, bit for bit.
    """

    def __init__(self, a, out_dir, backend):
        self.control = instantiate(a.kl_control)
        self.adaptive = a.kl_control.get("target") is not None
        self.path, self.backend = out_dir / KL_COEF_FILE, backend
        self.values: dict[int, float] = {0: float(a.kl.kl_coef)}

    def at(self, i: int) -> float:
        if not self.adaptive:
            return self.values[0]
        if i not in self.values:  # a resumed run: rollout i's value was written by the interrupted one
            read = {int(k): v for k, v in json.loads(self.path.read_text()).items()} if self.backend.is_main else None
            saved = self.backend.broadcast_object(read)
            if i not in saved:
                raise RuntimeError(f"{self.path} has no KL coefficient for rollout {i}; cannot resume exactly")
            self.values.update(saved)
        return self.values[i]

    def update(self, i: int, kl: float, n_steps: int) -> None:
        """Set rollout i + 1's coefficient from rollout i's measured KL."""
        self.values[i + 1] = float(self.control(self.values[i], kl, n_steps))
        if self.adaptive and self.backend.is_main:
            atomic_write_json(self.path, {str(k): v for k, v in sorted(self.values.items())})


class PPORollout:
    """``make_rollout`` for ``fit_online``: sample, score, KL-penalised token rewards, GAE, step batches."""

    def __init__(self, ctx: StageContext, policy, critic, tokenizer, prompts: list[dict], rewards, reference):
        a = ctx.section
        self.ctx, self.a, self.backend = ctx, a, ctx.backend
        self.policy, self.critic, self.reference = policy, critic, reference
        self.tokenizer, self.prompts, self.rewards = tokenizer, prompts, rewards
        self.P, self.S = int(a.prompts_per_rollout), int(a.steps_per_rollout)
        if not prompts:
            raise ValueError("the prompt view's train split is empty; PPO has nothing to sample from")
        self.generator = make_generator(a.generation, ctx.backend.unwrap(policy.model), tokenizer)
        self.aggregation = instantiate(a.aggregation)
        self.token_rewards, self.advantage = instantiate(a.kl), instantiate(a.advantage)
        self.kl = KLCoefficient(a, ctx.out_dir, ctx.backend)

    def __call__(self, i: int) -> Rollout:
        a, backend, P = self.a, self.backend, self.P
        seed = int(self.ctx.cfg.seed)
        blocks = rank_prompts(rollout_order(len(self.prompts), P, i, seed), self.S, backend.rank, backend.world_size)
        local = [(j, idx) for block in blocks for j, idx in block]
        rows = [self.prompts[idx] for _, idx in local]
        positions = [j for j, _ in local]
        seeds = [row_seed(seed, i, j) for j in positions]
        times: dict[str, float] = {}
        with timed(times, "time/generation"):
            completions = sample(self.generator, self.policy.model, [r["prompt_ids"] for r in rows], seeds, backend)
        ids = [c.ids for c in completions]
        with timed(times, "time/scoring"):
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            raw = score(self.rewards, a.reward_weights, rows, texts, ids)
        total = torch.nan_to_num(raw.total.float(), nan=0.0)  # a row no function applied to scores 0
        has_eos = torch.tensor([not c.truncated for c in completions])
        scores = missing_eos_penalty(total, has_eos, a.missing_eos_penalty)
        lengths = torch.tensor([float(len(x)) for x in ids])
        kl_coef = self.kl.at(i)

        examples = [{"prompt_ids": r["prompt_ids"], "completion_ids": c, "score": float(s)} for r, c, s in zip(rows, ids, scores)]
        per_step = len(examples) // self.S
        steps = [self._batches(examples[k * per_step : (k + 1) * per_step], times) for k in range(self.S)]
        batches = [b for step in steps for b in step]
        kl = self._advantages(batches, kl_coef)
        logps = torch.cat([masked_sum(b["old_logps"], b["completion_mask"], dim=-1) for b in batches])

        columns = {
            "score": scores, "reward": total, **{f"rewards/{n}/mean": v for n, v in raw.per_function.items()},
            "eos": has_eos.float(), "length": lengths, "kl": kl, "logps": logps,
        }
        metrics = {**self._metrics(columns, positions, kl_coef), **times}
        self.kl.update(i, metrics["objective/kl"], n_steps=P)
        samples = [
            {"prompt": r.get("prompt_text", ""), "completion": t, "reward": float(s)}
            for r, t, s in list(zip(rows, texts, scores.tolist()))[: max(int(a.samples), 0)]
        ]
        return Rollout(steps, metrics, samples)

    def _metrics(self, columns: dict[str, torch.Tensor], positions: list[int], kl_coef: float) -> dict[str, float]:
        """The rollout's metrics from each row's statistics, gathered over every process's rows."""
        stacked = global_rows(torch.stack(list(columns.values()), dim=1), positions, self.P, self.backend).float()
        full = dict(zip(columns, stacked.unbind(1)))
        # KL and log-probs are already summed over each completion's tokens: one column per row
        one_column = torch.ones(self.P, 1)
        stats = rollout_stats(full["score"], full["kl"][:, None], one_column, kl_coef=kl_coef, logps=full["logps"][:, None])
        return {
            **{k: float(v) for k, v in stats.items()},
            "objective/kl_coef": kl_coef,
            "val/num_eos_tokens": float(full["eos"].sum()),
            "reward": float(full["reward"].mean()),
            **{k: float(v.nanmean()) for k, v in full.items() if k.startswith("rewards/")},
            "completions/mean_length": float(full["length"].mean()),
            "completions/min_length": float(full["length"].min()),
            "completions/max_length": float(full["length"].max()),
            "completions/clipped_ratio": float(1 - full["eos"].mean()),
        }

    def _batches(self, examples: list[dict], times: dict[str, float]) -> list[dict]:
        """Collated micro-batches with the rollout's log-probs (policy, reference) and values; the passes'
        seconds are added to ``times``."""
        mb = int(self.ctx.train.micro_batch_size)
        context = {"max_completion_length": int(self.a.generation.max_new_tokens)}
        batches = []
        for start in range(0, len(examples), mb):
            batch = collate_completions(examples[start : start + mb], pad_id=self.tokenizer.pad_token_id)
            with timed(times, "time/values"):
                batch["old_logps"] = completion_logps(self.policy.model, batch, self.backend)
            with timed(times, "time/reference"):
                batch["ref_logps"] = reference_logps(self.reference, self.policy.model, batch, self.backend)
            with timed(times, "time/values"):
                batch["old_values"] = old_values(self.critic.model, batch, self.backend)
            batch["weights"], batch["num_items"] = self.aggregation(batch["completion_mask"], **context)
            batches.append(batch)
        return batches

    def _advantages(self, batches: list[dict], kl_coef: float) -> torch.Tensor:
        """Per-token rewards, GAE advantages and returns of every micro-batch, in place; whitening uses
        the moments of the whole rollout (all processes). Returns each row's summed KL, (rows,)."""
        a = self.a
        kl_sums = []
        for b in batches:
            mask = b["completion_mask"]
            b["rewards"], kl = self.token_rewards(b.pop("score"), b["old_logps"], b.pop("ref_logps"), mask, kl_coef=kl_coef)
            kl_sums.append(masked_sum(kl, mask, dim=-1))
        if a.whiten_rewards:
            self._whiten(batches, "rewards", shift_mean=False)
        for b in batches:
            b["advantages"], b["returns"] = self.advantage(b.pop("rewards"), b["old_values"], b["completion_mask"])
        if a.whiten_advantages:
            self._whiten(batches, "advantages", shift_mean=True)
        return torch.cat(kl_sums)

    def _whiten(self, batches: list[dict], key: str, *, shift_mean: bool) -> None:
        local = sum(masked_moments(b[key], b["completion_mask"]) for b in batches)
        moments = self.backend.all_reduce_sum(local.to(self.backend.device)).cpu()
        for b in batches:
            b[key] = whiten(b[key], b["completion_mask"], moments=moments, shift_mean=shift_mean)
