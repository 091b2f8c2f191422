"""sft: supervised fine-tuning with the configured token loss (``algorithm.loss``).

The LM head runs on the positions the loss counts only (``models/counted_head.py``), and with
``train.packing`` each micro-batch's examples are packed padding-free into rows of ``data.max_length``.
"""

from __future__ import annotations

from functools import partial

from hydra.utils import instantiate

from align_runner.algos.sft import IGNORE_INDEX
from align_runner.algos.types import LossOutput
from align_runner.data.collate import collate_packed_sft, collate_sft, sft_tokens
from align_runner.engine.metric_names import offline
from align_runner.models.counted_head import CountedHead
from align_runner.registry import register_stage
from align_runner.stages.context import StageContext


def sft_step(model, batch: dict, *, head: CountedHead, loss_fn) -> LossOutput:
    """``loss_fn`` on the log-probs of the batch's trained tokens (labels other than -100)."""
    return loss_fn(head.target_logps(model, batch, batch["labels"] != IGNORE_INDEX), batch["labels"])


@register_stage(
    "sft",
    trains=True,
    views=("sft",),
    key_metrics=("loss", "eval/loss", "mean_token_accuracy"),
    metrics=offline("mean_token_accuracy", "num_tokens"),  # algos.sft.sft_loss's
)
def run_sft(ctx: StageContext) -> dict[str, float]:
    tokenizer = ctx.tokenizer()
    policy = ctx.load_policy()
    head = CountedHead(policy, int(ctx.train.logits_chunk_tokens))
    step = partial(sft_step, head=head, loss_fn=instantiate(ctx.section.loss))
    if ctx.train.packing:
        collate = partial(collate_packed_sft, pad_id=tokenizer.pad_token_id, max_tokens=int(ctx.cfg.data.max_length))
    else:
        collate = partial(collate_sft, pad_id=tokenizer.pad_token_id)
    train_rows, eval_rows = ctx.splits("sft")
    result = ctx.engine().fit(
        step, model=policy, train_data=train_rows, collate=collate, eval_data=eval_rows, eval_step=step, length=sft_tokens
    )
    ctx.save_model(policy, tokenizer)
    return result.metrics
