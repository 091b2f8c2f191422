"""sft: supervised fine-tuning with the configured token loss (``algorithm.loss``)."""

from __future__ import annotations

from functools import partial

from hydra.utils import instantiate

from align_runner.data.collate import collate_sft
from align_runner.registry import register_stage
from align_runner.stages.context import StageContext


@register_stage("sft", trains=True, views=("sft",), key_metrics=("loss", "eval/loss", "mean_token_accuracy"))
def run_sft(ctx: StageContext) -> dict[str, float]:
    tokenizer = ctx.tokenizer()
    policy = ctx.load_policy()
    loss_fn = instantiate(ctx.section.loss)

    def step(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return loss_fn(logits, batch["labels"])

    train_rows, eval_rows = ctx.splits("sft")
    result = ctx.engine().fit(
        step,
        model=policy,
        train_data=train_rows,
        collate=partial(collate_sft, pad_id=tokenizer.pad_token_id),
        eval_data=eval_rows,
        eval_step=step,
    )
    ctx.save_model(policy, tokenizer)
    return result.metrics
