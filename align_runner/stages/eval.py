"""eval: generate on held-out prompts, score with the configured checkers, and measure held-out loss.

The pipeline runs it on the main stage's input model ("eval_before") and output ("eval_after"); both
are ordinary cached stages. Metrics are the mean score of each checker (``accuracy``, ``format``, ...),
the mean score of the pipeline's reward model when it has a ``reward`` stage (``reward_model``), and
``heldout_loss``; ``samples.json`` keeps the first generations for the report.

On several processes each generates a strided share of the prompts (and of the held-out loss batches);
the main process gathers them in prompt order, scores and writes once: the metrics and samples are the
same, bitwise on CPU, as a single process's.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from align_runner.algos.rewards import call_reward, mean_score
from align_runner.algos.sft import sft_loss
from align_runner.data.collate import collate_sft
from align_runner.engine.rollout import generate
from align_runner.engine.shards import gather_in_order, shard
from align_runner.registry import Input, register_stage
from align_runner.stages.context import StageContext

log = logging.getLogger("align_runner")


def checker_names(cfg, spec) -> list[str]:
    """The mean score each checker reports: the configured ones, and the reward model when bound."""
    names = list(OmegaConf.select(cfg, spec.config).checkers)
    return names + (["reward_model"] if "reward_model" in dict(spec.inputs) else [])


@register_stage(
    "eval",
    trains=False,
    views=("prompt", "sft"),
    # with a reward stage in the pipeline, its model scores the generations too (metric "reward_model")
    inputs={"reward_model": Input("reward", required=False, what="the reward model that scores its generations")},
    key_metrics=("accuracy", "format", "reward_model", "heldout_loss"),
    metrics=lambda cfg, spec: ("num_prompts", "completion_tokens", "heldout_loss", *checker_names(cfg, spec)),
)
def run_eval(ctx: StageContext) -> dict[str, float]:
    ev = ctx.section
    tokenizer = ctx.tokenizer()
    model = ctx.load_policy().eval()
    rows = ctx.dataset("prompt", "eval")
    if ev.limit is not None:
        rows = rows[: ev.limit]
    completion_ids = generate_split(ctx, model, tokenizer, [r["prompt_ids"] for r in rows])
    loss = None
    if ev.heldout_loss and ctx.has_dataset("sft", "eval"):
        loss = heldout_loss(model, ctx.dataset("sft", "eval"), tokenizer.pad_token_id, ev.batch_size, ctx.backend)
    # scored and written once, by the main process; every process returns the main one's metrics (the
    # runner keeps each process's stage metrics)
    metrics = score_and_write(ctx, rows, completion_ids, tokenizer, loss) if ctx.is_main else None
    return ctx.backend.broadcast_object(metrics)


def generate_split(ctx: StageContext, model, tokenizer, prompt_ids: list[list[int]]) -> list[list[int]] | None:
    """Every prompt's completion ids, in prompt order, on the main process (None elsewhere).

    Each process generates its strided share (engine.shards), each prompt seeded from (seed, its index),
    so the completions are the same on any number of processes. Collective."""
    ev, backend = ctx.section, ctx.backend
    mine = shard(len(prompt_ids), backend.rank, backend.world_size)
    log.info("%s: rank %d generates %d of %d prompts", ctx.spec.name, backend.rank, len(mine), len(prompt_ids))
    local = generate(
        model,
        tokenizer,
        [prompt_ids[i] for i in mine],
        max_new_tokens=ev.max_new_tokens,
        temperature=ev.temperature,
        batch_size=ev.batch_size,
        seed=int(ctx.cfg.seed),
        index=mine,
        progress=ctx.is_main,
        desc=f"{ctx.spec.name}: generate",
    )
    return gather_in_order(backend, local)


def score_and_write(ctx: StageContext, rows: list[dict], completion_ids, tokenizer, heldout: float | None) -> dict[str, float]:
    """The metrics of the completions ``completion_ids`` of prompt ``rows`` (scored by the checkers and
    the reward model), with ``heldout`` loss when measured; writes samples.json and metrics.jsonl."""
    ev = ctx.section
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    prompts = [r["prompt_text"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt_ids", "prompt_text")} if rows else {}

    metrics: dict[str, float] = {"num_prompts": float(len(rows))}
    scores: dict[str, list[float | None]] = {}
    # checkers are reward functions (TRL's keyword call); prompt_ids lets a reward-model scorer check too
    checker_columns = {**columns, "prompt_ids": [r["prompt_ids"] for r in rows]}
    checkers = {name: instantiate(node) for name, node in ev.checkers.items()}
    if ctx.has_input("reward_model"):
        from align_runner.models.scorer import RewardModelScorer

        checkers["reward_model"] = RewardModelScorer(ctx.input_dir("reward_model"), device=ctx.backend.device, dtype=ctx.dtype)
    for name, checker in checkers.items():
        scores[name] = call_reward(
            checker, prompts=prompts, completions=completions, completion_ids=completion_ids, columns=checker_columns
        )
        metrics[name] = mean_score(scores[name])  # None: the checker does not apply to that row
    metrics["completion_tokens"] = sum(len(c) for c in completion_ids) / max(len(completion_ids), 1)
    if heldout is not None:
        metrics["heldout_loss"] = heldout

    samples = [
        {"prompt": p, "completion": c, **{k: v[i] for k, v in columns.items()}, **{k: s[i] for k, s in scores.items()}}
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    ctx.write_json("samples.json", samples[: max(ev.samples, 0)])
    ctx.tracker.log(metrics, step=0)
    return metrics


@torch.no_grad()
def heldout_loss(model, rows: list[dict], pad_id: int, batch_size: int, backend) -> float | None:
    """Token-weighted mean SFT loss over ``rows`` (prepared sft rows), on the main process (None elsewhere).

    Each process takes a strided share of the batches; the main process adds the per-batch sums in batch
    order, so the value is the same, bitwise, on any number of processes. Collective."""
    collate = partial(collate_sft, pad_id=pad_id)
    device = next(model.parameters()).device
    starts = range(0, len(rows), batch_size)
    sums = []
    for b in shard(len(starts), backend.rank, backend.world_size):
        batch = collate(rows[starts[b] : starts[b] + batch_size])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        out = sft_loss(logits, batch["labels"].to(device))
        sums.append((float(out.loss) * float(batch["num_items"]), float(batch["num_items"])))
    every = gather_in_order(backend, sums)
    if every is None:
        return None
    total, items = 0.0, 0.0
    for batch_total, batch_items in every:
        total += batch_total
        items += batch_items
    return total / max(items, 1.0)
