"""reward: a scalar reward model (a score head on the input backbone) trained on preference pairs.

The backbone trains in full, or with LoRA adapters when ``model.lora`` is set (merged into the saved
model). The loss is ``algorithm.loss``, by default the Bradley-Terry loss with optional reward centering
(``align_runner.algos.reward.bradley_terry_loss``). A prepared preference row with a numeric
``margin`` field gets that margin in the loss (Llama 2's preference strength). The model is saved as
a Hugging Face sequence classifier with ``num_labels=1``: ``AutoModelForSequenceClassification``
reloads it, and its logit at the last real token of prompt + response is the reward. Later stages
read it as a scorer, never continue training it as a policy (``policy=False``).

With ``train.packing`` each pair is packed as one prompt + chosen + rejected unit, the prompt computed
once (``collate_packed_pairs_sharing_prompts``); with flash-attention, as two packed sequences.

Metrics: ``accuracy``, ``margin``, ``rewards/chosen_mean``, ``rewards/rejected_mean``, ``rewards/std``
on the training batches, and the same under ``eval/`` on the held-out preference split.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from hydra.utils import instantiate
from torch import nn

from align_runner.algos.types import LossOutput
from align_runner.data.collate import pair_tokens, preference_collator
from align_runner.engine.metric_names import offline
from align_runner.models.counted_head import model_inputs
from align_runner.models.loading import (
    enable_gradient_checkpointing,
    load_sequence_classifier,
    speed_options,
    takes_attention_masks,
)
from align_runner.models.peft import is_peft_model, peft_lora_config
from align_runner.registry import register_stage
from align_runner.stages.context import StageContext


def pair_margin(batch: dict) -> torch.Tensor | None:
    """The batch's per-pair ``margin`` (B,), or None when the rows have none."""
    margin = batch.get("margin")
    if margin is None or isinstance(margin, torch.Tensor):
        return margin
    # collate_preference leaves a field as a list when some row lacks it or it is not a number
    raise ValueError(f"the 'margin' field must be a number in every preference row, got {margin!r}")


def with_lora(model: nn.Module, lora) -> nn.Module:
    """LoRA adapters (``model.lora``) on the backbone of a sequence classifier.

    PEFT's sequence-classification task trains the new score head in full (it goes to
    ``modules_to_save``): a random head cannot be a low-rank update of anything.
    """
    from peft import TaskType, get_peft_model

    return get_peft_model(model, replace(peft_lora_config(lora), task_type=TaskType.SEQ_CLS))


class TokenScores:
    """Keeps the score head's per-position output of the latest forward (a forward hook on ``score``).

    The classifier pools its scores at each ROW's last real token; a packed row holds several sequences,
    whose rewards are the scores at each SEQUENCE's last token, so they are read from the head's own
    output, inside the one forward of the wrapped model.
    """

    def __init__(self, model: nn.Module):
        base = model.get_base_model() if is_peft_model(model) else model
        self.scores: torch.Tensor | None = None
        base.score.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.scores = output

    def sequence_scores(self, batch: dict) -> torch.Tensor:
        """(2B,) score at the last token of each packed sequence, in sequence order."""
        assert self.scores is not None, "no forward ran"
        seq = batch["sequence_ids"]
        last = seq != torch.cat([seq[:, 1:], torch.full_like(seq[:, :1], -1)], dim=1)
        last &= seq >= 0
        out = self.scores.new_zeros(2 * int(batch["num_items"]))
        return out.index_put((seq[last],), self.scores.squeeze(-1)[last])


def reward_step(model, batch: dict, *, loss_fn, token_scores: TokenScores | None = None) -> LossOutput:
    """Score the 2B chosen + rejected sequences in one forward; the loss is the mean over the B pairs."""
    logits = model(**model_inputs(batch)).logits
    scores = token_scores.sequence_scores(batch) if "sequence_ids" in batch else logits.squeeze(-1)
    chosen, rejected = scores.chunk(2)
    margin = pair_margin(batch)
    return loss_fn(chosen, rejected, margin=None if margin is None else margin.to(scores.dtype))


@register_stage(
    "reward",
    trains=True,
    views=("preference",),
    policy=False,
    key_metrics=("loss", "eval/accuracy", "accuracy"),
    # algos.reward.bradley_terry_loss's
    metrics=offline("accuracy", "margin", "rewards/chosen_mean", "rewards/rejected_mean", "rewards/std"),
)
def run_reward(ctx: StageContext) -> dict[str, float]:
    tokenizer = ctx.tokenizer()
    # The score head is new and random: seed its initialisation so the stage key fixes the result.
    torch.manual_seed(int(ctx.cfg.seed))
    model = load_sequence_classifier(
        ctx.input_model_path(), dtype=ctx.dtype, **speed_options(ctx.cfg.model, training=True)
    )
    if ctx.cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if ctx.cfg.model.lora is not None:
        model = with_lora(model, ctx.cfg.model.lora)
    model = model.to(ctx.backend.device)
    step = partial(reward_step, loss_fn=instantiate(ctx.section.loss), token_scores=TokenScores(model))
    train_rows, eval_rows = ctx.splits("preference")
    result = ctx.engine().fit(
        step,
        model=model,
        train_data=train_rows,
        collate=preference_collator(
            tokenizer.pad_token_id,
            packing=ctx.train.packing,
            max_tokens=int(ctx.cfg.data.max_length),
            share_prompts=takes_attention_masks(ctx.cfg.model),
        ),
        eval_data=eval_rows,
        eval_step=step,
        length=pair_tokens,
    )
    if is_peft_model(model):
        # a reward model is read as a whole classifier (AutoModelForSequenceClassification), so its
        # adapters are merged into the backbone before saving
        model = model.merge_and_unload()
    ctx.save_model(model, tokenizer)
    return result.metrics
