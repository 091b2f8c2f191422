"""dpo: offline preference optimisation with any loss of ``align_runner.algos.dpo`` (``algorithm.loss``).

Each step runs ONE forward pass, the policy's, over the 2B concatenated chosen + rejected rows (packed
padding-free with ``train.packing``; the LM head runs on response tokens only); the
reference log-probs come precomputed from the ``ref_logps`` stage named by ``algorithm.reference.stage``
(pipeline=auto inserts it right before this stage, on the same input model). Metrics are the losses'
own: ``rewards/{chosen,rejected,accuracies,margins}`` and ``logps/{chosen,rejected}``, and the same on
the held-out preference split under ``eval/`` (``eval/rewards/accuracies`` is the implicit-reward
preference accuracy of the trained policy).
"""

from __future__ import annotations

from functools import partial

from hydra.utils import instantiate
from torch import Tensor

from align_runner.algos.types import LossOutput, PreferenceLogps
from align_runner.data.collate import collate_packed_preference, collate_preference, pair_tokens
from align_runner.engine.metric_names import offline
from align_runner.models.counted_head import CountedHead
from align_runner.registry import Input, register_stage
from align_runner.stages.context import StageContext
from align_runner.stages.ref_logps import attach_reference, preference_forward


def batch_logps(logps: Tensor, tokens: Tensor, batch: dict) -> PreferenceLogps:
    """PreferenceLogps of a ``collate_preference`` batch from the policy's (2B,) sequence log-probs and
    response token counts (chosen rows first), with the reference's from the batch's ``ref_*`` fields.

    ``chosen_nll`` is the policy's mean per-token NLL of the chosen response (RPO's extra term);
    ``chosen_tokens`` / ``rejected_tokens`` let IPO length-average.
    """
    policy_chosen, policy_rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return PreferenceLogps(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=batch["ref_chosen_logps"].to(logps.dtype),
        ref_rejected=batch["ref_rejected_logps"].to(logps.dtype),
        chosen_nll=-policy_chosen / chosen_tokens.clamp(min=1).to(logps.dtype),
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )


def dpo_step(model, batch: dict, *, head: CountedHead, loss_fn) -> LossOutput:
    """``loss_fn(PreferenceLogps)`` on one micro-batch: the mean over its B pairs."""
    logps, tokens = preference_forward(model, batch, head)
    return loss_fn(batch_logps(logps, tokens, batch))


def preference_collate(ctx: StageContext, pad_id: int):
    """Padded pairs, or with ``train.packing`` the 2B sequences packed into rows of ``data.max_length``."""
    if ctx.train.packing:
        return partial(collate_packed_preference, pad_id=pad_id, max_tokens=int(ctx.cfg.data.max_length))
    return partial(collate_preference, pad_id=pad_id)


@register_stage(
    "dpo",
    trains=True,
    views=("preference",),
    inputs={"reference": Input("ref_logps", derived="reference", what="reference log-probs")},
    key_metrics=("loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies"),
    # the losses' own (algos/dpo.py; nll_loss: RPO). A mixture_loss's <loss>/<name> are not declared
    metrics=offline(*(f"{w}/{s}" for w in ("rewards", "logps") for s in ("chosen", "rejected")),
                    "rewards/margins", "rewards/accuracies", "nll_loss"),
)
def run_dpo(ctx: StageContext) -> dict[str, float]:
    tokenizer = ctx.tokenizer()
    policy = ctx.load_policy()
    head = CountedHead(policy, int(ctx.train.logits_chunk_tokens))
    step = partial(dpo_step, head=head, loss_fn=instantiate(ctx.section.loss))
    ref_dir = ctx.input_dir("reference")
    train_rows, eval_rows = ctx.splits("preference")
    train_rows = attach_reference(train_rows, ref_dir, "train")
    eval_rows = attach_reference(eval_rows, ref_dir, "eval") if eval_rows is not None else None
    result = ctx.engine().fit(
        step,
        model=policy,
        train_data=train_rows,
        collate=preference_collate(ctx, tokenizer.pad_token_id),
        eval_data=eval_rows,
        eval_step=step,
        length=pair_tokens,
    )
    ctx.save_model(policy, tokenizer)
    return result.metrics
