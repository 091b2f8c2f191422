"""What the online stages (grpo, ppo) share: which prompts a process samples, sampling, scoring, and
the log-probs of completions under the policy or its frozen reference.

Prompt j of rollout i is drawn from (seed, i) and each completion is sampled from a seed of its own
(``row_seed``); the prompts of each optimizer step are dealt out to the processes in equal blocks, so
2 processes sample and train on what 1 process does, and a resumed run on what the uninterrupted run did.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from align_runner.algos.grpo import PolicyBatch
from align_runner.algos.logprobs import token_logps
from align_runner.algos.policy import entropy_from_logits
from align_runner.algos.rewards import score_completions
from align_runner.engine.loop import schedule_indices
from align_runner.engine.rollout import Generator, eos_token_ids
from align_runner.models.peft import reference_mode
from align_runner.stages.context import StageContext
from align_runner.validate import require


def completion_logits(model, batch: dict):
    """Logits predicting each completion token, (B, C, V): the LM head runs on those columns only
    (``logits_to_keep``), not on the prompt's, which carry no loss (see ``collate_completions``)."""
    width = batch["completion_ids"].shape[1]
    shared = "logit_index" in batch  # the shared-prompt layout: one packed row per prompt
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=batch["logit_index"] if shared else width + 1,
    ).logits
    if shared:
        packed = logits.view(logits.shape[0], -1, width, logits.shape[-1])
        return packed[batch["row_of"], batch["slot_of"]]
    return logits[:, -width - 1 : -1]


@torch.no_grad()
def completion_logps(model, batch: dict, backend) -> torch.Tensor:
    """Log-probs (B, C) of a collated batch's completion tokens under ``model`` (0 on padding), on the
    CPU: the old policy's or the reference's, kept with the batch for its optimizer steps."""
    on_device = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with backend.autocast():
        logps = token_logps(completion_logits(model, on_device), on_device["completion_ids"])
    return (logps.float() * on_device["completion_mask"]).cpu()


def policy_step(model, batch: dict, *, loss_fn):
    """The policy loss on one micro-batch of completions (mean over the aggregation's ``num_items``):
    GRPO's step, and PPO's policy step (its advantages per token)."""
    logits = completion_logits(model, batch)
    logps = token_logps(logits, batch["completion_ids"])
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return loss_fn(
        PolicyBatch(
            logps=logps,
            mask=batch["completion_mask"],
            advantages=batch["advantages"].to(logps.dtype),
            weights=batch["weights"],
            num_items=float(batch["num_items"]),
            old_logps=batch.get("old_logps"),
            ref_logps=batch.get("ref_logps"),
            entropy=entropy,
        )
    )


def reference_logps(reference, policy, batch: dict, backend) -> torch.Tensor:
    """``completion_logps`` under the frozen reference: ``reference`` (a copy of the input model), or
    the policy itself with its LoRA adapters disabled when ``reference`` is None."""
    if reference is not None:
        return completion_logps(reference, batch, backend)
    with reference_mode(backend.unwrap(policy)):
        return completion_logps(policy, batch, backend)


def rollout_order(n: int, prompts_per_rollout: int, rollout: int, seed: int) -> list[int]:
    """Indices of the prompts of rollout ``rollout`` (epochs over the n prompts, each shuffled from the seed)."""
    steps_per_epoch = max(1, math.ceil(n / prompts_per_rollout))
    epoch, pos = divmod(rollout, steps_per_epoch)
    return schedule_indices(n, prompts_per_rollout, epoch, seed)[pos]


def rank_prompts(order: list[int], steps: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    """This process's (position in the rollout, prompt index) pairs for each optimizer step.

    Step k trains on the k-th block of the rollout's prompts; each process takes an equal sub-block,
    so the prompts of a step are the same whatever the number of processes.
    """
    per_step = len(order) // steps
    per_rank = per_step // world
    out = []
    for k in range(steps):
        first = k * per_step + rank * per_rank
        out.append([(j, order[j]) for j in range(first, first + per_rank)])
    return out


def global_rows(values: torch.Tensor, positions: list[int], size: int, backend) -> torch.Tensor:
    """A rollout-wide (size, ...) float64 tensor from each process's rows at their global ``positions``."""
    full = torch.zeros((size, *values.shape[1:]), dtype=torch.float64)
    full[positions] = values.double()
    return backend.all_reduce_sum(full).cpu()


def reward_names(cfg, spec) -> list[str]:
    """The names ``reward_functions`` gives the stage ``spec`` of ``cfg`` (for its metric declaration)."""
    names = list(OmegaConf.select(cfg, spec.config).rewards)
    return names + (["reward_model"] if "reward_model" in dict(spec.inputs) else [])


def held_reward_model(spec) -> int:
    """1 when the stage reads the pipeline's reward model (``reward_functions`` loads it whole), else 0:
    its share of ``registry.HeldModels``."""
    return int("reward_model" in dict(spec.inputs))


def reward_functions(ctx: StageContext) -> dict[str, Any]:
    """The configured reward functions, plus the pipeline's reward model (``reward_model``) when the
    stage has that input."""
    funcs = {name: instantiate(node) for name, node in ctx.section.rewards.items()}
    if ctx.has_input("reward_model"):
        from align_runner.models.scorer import RewardModelScorer

        funcs["reward_model"] = RewardModelScorer(ctx.input_dir("reward_model"), device=ctx.backend.device, dtype=ctx.dtype)
    return funcs


def score(rewards: dict[str, Any], weights: dict, rows: list[dict], texts: list[str], ids: list[list[int]]):
    """``score_completions`` of completions ``texts`` / ``ids`` of prompt rows ``rows`` (their other
    columns passed to the reward functions as keywords)."""
    skip = {"prompt", "prompt_text", "prompt_ids"}
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in skip}
    columns["prompt_ids"] = [r["prompt_ids"] for r in rows]
    conversational = isinstance(rows[0].get("prompt"), list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    return score_completions(
        rewards,
        weights=dict(weights),
        prompts=[r.get("prompt", r.get("prompt_text")) for r in rows],
        completions=completions,
        completion_ids=ids,
        columns=columns,
    )


def make_generator(generation, model, tokenizer) -> Generator:
    """The rollout sampler configured by ``algorithm.generation``."""
    g = generation
    return Generator(
        eos_ids=eos_token_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=int(g.max_new_tokens),
        temperature=float(g.temperature),
        top_p=float(g.top_p),
        top_k=int(g.top_k),
        min_p=float(g.min_p),
        batch_size=int(g.batch_size),
    )


def sample(generator: Generator, model, prompt_ids, seeds, backend):
    """This process's completions of ``prompt_ids``, each from its seed, with the (wrapped) ``model``."""
    sync = None
    if backend.world_size > 1:  # sharded weights make every forward a collective: decode in lockstep
        def sync(local_done: bool) -> bool:
            return float(backend.all_reduce_sum(torch.tensor(float(not local_done))).item()) == 0.0

    with backend.autocast():
        return generator.generate(backend.unwrap(model), prompt_ids, seeds, sync=sync)


def check_generation(g, where: str) -> None:
    """Compose-time check of an ``algorithm.generation`` node."""
    require(g.max_new_tokens >= 1, f"{where}.max_new_tokens", "an integer >= 1", g.max_new_tokens)
    require(g.temperature >= 0, f"{where}.temperature", ">= 0 (0 = greedy)", g.temperature)
    require(0 < g.top_p <= 1, f"{where}.top_p", "a probability in (0, 1]", g.top_p)
    require(g.top_k >= 0, f"{where}.top_k", "an integer >= 0 (0 = off)", g.top_k)
    require(0 <= g.min_p < 1, f"{where}.min_p", "a fraction in [0, 1)", g.min_p)
    require(g.batch_size >= 1, f"{where}.batch_size", "an integer >= 1", g.batch_size)


def check_rollout_sizes(a, cfg, where: str, counts: tuple[str, ...]) -> None:
    """Compose-time check: the ``counts`` are >= 1 and each optimizer step's prompts split evenly
    over the processes."""
    hw = cfg.hardware
    world = int(hw.num_processes) * int(hw.num_nodes)
    for key in counts:
        require(a[key] >= 1, f"{where}.{key}", "an integer >= 1", a[key])
    blocks = int(a.steps_per_rollout) * world
    require(
        a.prompts_per_rollout % blocks == 0,
        f"{where}.prompts_per_rollout",
        f"a multiple of steps_per_rollout x processes = {a.steps_per_rollout} x {world} (each step's prompts are "
        "dealt out to the processes in equal blocks)",
        a.prompts_per_rollout,
    )
    check_generation(a.generation, f"{where}.generation")


def check_scorers(a, spec, where: str) -> None:
    """Compose-time check: something scores the completions."""
    scorers = dict(a.rewards) or {k: v for k, v in spec.inputs if k == "reward_model"}
    require(bool(scorers), f"{where}.rewards", "at least one reward function, or a reward stage in the pipeline", {})
